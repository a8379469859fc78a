"""ONNX export and the torch-free production runtime.

Importing this package (and :func:`load_export`) never imports torch; :func:`export_model` does,
and is loaded on first use so that production code can depend on the runtime alone.
"""

from cmalign.export.manifest import ExportFormatError, read_manifest
from cmalign.export.runtime import ExportedModel, ProviderUnavailableError, load_export

__all__ = ["ExportedModel", "ExportFormatError", "ProviderUnavailableError", "load_export", "read_manifest",
           "export_model", "ExportConfig", "ParityError"]


def __getattr__(name):
    if name in ("export_model", "ExportConfig", "ExportResult", "ParityError"):
        from cmalign.export import onnx_export

        return getattr(onnx_export, name)
    raise AttributeError(f"module 'cmalign.export' has no attribute '{name}'")
