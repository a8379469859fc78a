"""ONNX export and the torch-free production runtime.

Importing this package (and :func:`load_export`) never imports torch; :func:`export_model` does,
and is loaded on first use so that production code can depend on the runtime alone.
"""

from cmalign._lazy import lazy_exports
from cmalign.export.manifest import ExportFormatError, read_manifest
from cmalign.export.runtime import ExportedModel, ProviderUnavailableError, load_export

__getattr__, _LAZY = lazy_exports(__name__, {"onnx_export": ("export_model", "ExportConfig", "ExportResult",
                                                             "ParityError")})
__all__ = ["ExportedModel", "ExportFormatError", "ProviderUnavailableError", "load_export", "read_manifest", *_LAZY]
