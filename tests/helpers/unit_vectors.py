"""Unit-length test vectors: every metric scores cosines of L2-normalised rows."""

import numpy as np

from cmalign.metrics.vectors import l2_normalize


def unit(a):
    return l2_normalize(a)


def random_unit(n, d, seed=0):
    return unit(np.random.default_rng(seed).normal(size=(n, d)))
