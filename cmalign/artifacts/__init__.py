"""What every stage writes and reads back: atomic files, manifests, file checksums, which artifact a path is,
and whether ``--out`` may be written.

The error base every stage raises lives beside this package, in :mod:`cmalign.errors`.
"""
