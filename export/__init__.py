"""ONNX export and the torch-free production runtime.

    onnx_export.py  export_model(): a run or model → checked ONNX encoders + preprocessing + tokenizer + manifest
    graphs.py       the encoder modules, the ONNX export call and the graph checks       (torch)
    precision.py    fp16 and int8 variants of the fp32 graphs
    parity.py       each graph and the torch-free pipeline against torch eager; R@1      (torch)
    manifest.py     the export directory's self-description and fingerprint
    runtime.py      load_export(): onnxruntime sessions, preprocessing and tokenizer     (no torch)
    preprocess.py   open_clip's inference transform in numpy/PIL                         (no torch)
    tokenizer.py    open_clip's BPE tokenizer, id for id                                 (no torch)
    prefetch.py     ordered map over a thread pool (decoding next to inference)

Importing this package (and :func:`load_export`) never imports torch; :func:`export_model` does,
and is loaded on first use so that production code can depend on the runtime alone.
"""

from cmalign._lazy import lazy_exports
from cmalign.export.manifest import ExportFormatError, read_manifest
from cmalign.export.runtime import ExportedModel, ProviderUnavailableError, load_export

__getattr__, _LAZY = lazy_exports(__name__, {"onnx_export": ("export_model", "ExportConfig", "ExportResult",
                                                             "ParityError")})
__all__ = ["ExportedModel", "ExportFormatError", "ProviderUnavailableError", "load_export", "read_manifest", *_LAZY]
