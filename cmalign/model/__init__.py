"""open_clip models: loading, freezing and saving them, and the embedded base model (a stand-in for a pretrained CLIP)."""
