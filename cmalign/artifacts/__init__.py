"""What every stage writes and reads back: atomic files, manifests, and which artifact a path is.

The error base every stage raises lives beside this package, in :mod:`cmalign.errors`.
"""
