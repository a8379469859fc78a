"""cmalign: close the modality gap of CLIP-style models for retrieval stacks."""

__version__ = "0.1.0"
