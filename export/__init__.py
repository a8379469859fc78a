"""ONNX export and the torch-free production runtime (`cmalign export`, `cmalign embed`).

Not built yet: this package is reserved by the repository layout and is filled by the export issue.
"""
