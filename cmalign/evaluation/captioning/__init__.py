"""The caption-prefix protocol: a small ClipCap-style decoder trained on text embeddings, scored by CIDEr-D."""
