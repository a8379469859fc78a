"""`cmalign embed`: encoding a corpus with an ONNX export (no torch) and the on-disk embeddings store."""
