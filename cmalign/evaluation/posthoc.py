"""Post-hoc fixes of the modality gap, applied to a model's own embeddings: the baselines fine-tuning must beat.

All are fitted on *training* pairs and applied unchanged to the evaluation set (and to every text the tasks embed:
captions, class prompts, the caption decoder's training captions). Rows are re-normalised afterwards, since every
task scores cosine similarity. One exception, by design of the method it stands for: GR-CLIP's centring keeps
separate means for query texts and documents, so the class prompts (queries of another distribution than the
captions stored as documents) are centred by their own mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import orthogonal_procrustes

from cmalign.errors import ConfigError
from cmalign.metrics.vectors import l2_normalize

NAMES = ("centring", "liang", "procrustes", "grclip")
DESCRIPTIONS = {
    "centring": "per-modality mean-centring (C3 / I0T_post): subtract each modality's training mean",
    "liang": "Liang et al.'s shift: move both modalities along the centroid difference to its midpoint",
    "procrustes": "orthogonal Procrustes map text → image fitted on training pairs (images unchanged)",
    "grclip": "GR-CLIP-style centring (Li et al. 2025, mixed-modality search): images and document captions minus "
              "their training means, query texts of their own distribution (class prompts) minus their own mean",
}


@dataclass
class PosthocMap:
    """One fitted fix: ``image(x)`` and ``text(y)`` map embeddings of either modality."""

    name: str
    image_shift: np.ndarray  # added to images
    text_shift: np.ndarray  # added to texts (after the rotation)
    text_rotation: np.ndarray | None = None
    renormalise: bool = True
    own_query_mean: bool = False  # GR-CLIP: query texts (class prompts) are centred by their own mean

    def queries(self, q: np.ndarray) -> np.ndarray:
        """Query texts that are not captions (class prompts): as texts, or centred by their own mean (GR-CLIP)."""
        if not self.own_query_mean:
            return self.text(q)
        q = np.asarray(q, np.float64)
        out = q - q.mean(0)
        return l2_normalize(out) if self.renormalise else out

    def image(self, x: np.ndarray) -> np.ndarray:
        out = np.asarray(x, np.float64) + self.image_shift
        return l2_normalize(out) if self.renormalise else out

    def text(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, np.float64)
        out = (y @ self.text_rotation if self.text_rotation is not None else y) + self.text_shift
        return l2_normalize(out) if self.renormalise else out

    def describe(self) -> dict:
        return {"name": self.name, "description": DESCRIPTIONS[self.name], "renormalise": self.renormalise}


def fit_posthoc(name: str, train_image: np.ndarray, train_text: np.ndarray, renormalise: bool = True,
                liang_lambda: float = 1.0) -> PosthocMap:
    """Fit fix ``name`` on paired training embeddings (row i of each is one pair).

    ``liang_lambda`` is the share of the centroid gap Liang's shift closes (1 = both means meet).
    """
    x, y = np.asarray(train_image, np.float64), np.asarray(train_text, np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ConfigError(f"paired training embeddings of equal shape are needed, got {x.shape} and {y.shape}")
    zero = np.zeros(x.shape[1])
    mu_x, mu_y = x.mean(0), y.mean(0)
    if name == "centring":
        return PosthocMap(name, -mu_x, -mu_y, renormalise=renormalise)
    if name == "liang":
        delta = mu_x - mu_y
        return PosthocMap(name, -liang_lambda * delta / 2, liang_lambda * delta / 2, renormalise=renormalise)
    if name == "grclip":
        return PosthocMap(name, -mu_x, -mu_y, renormalise=renormalise, own_query_mean=True)
    if name == "procrustes":
        rotation, _ = orthogonal_procrustes(y, x)  # argmin_R ||y R − x||_F over orthogonal R
        return PosthocMap(name, zero, zero, text_rotation=rotation, renormalise=renormalise)
    raise ConfigError(f"unknown post-hoc fix '{name}'; expected one of {', '.join(NAMES)}")


def parse_posthoc(spec: str | None) -> tuple[str, ...]:
    """'all', 'none', or a comma list of :data:`NAMES`."""
    if not spec or spec == "none":
        return ()
    if spec == "all":
        return NAMES
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    bad = [n for n in names if n not in NAMES]
    if bad:
        raise ConfigError(f"--posthoc: unknown fix(es) {', '.join(bad)}; expected all, none or any of "
                         f"{', '.join(NAMES)}")
    return names
