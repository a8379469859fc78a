"""The fp16 and int8 variants of an exported fp32 graph (each validated against torch by the export)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx


def convert_fp16(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True))
    model.topological_sort()  # the converter appends the input casts after their users
    onnx.save(model.model, str(dst))


# Dynamic int8 leaves two things in float (measured on the tiny model's generated validation split and,
# for speed, on ViT-B-32-shaped graphs at batch 32 on a 2-core AVX-512-VNNI EPYC):
# - Conv (the patch embedding): onnxruntime's ConvInteger is 3.3x *slower* than the float Conv for
#   ViT-B-32's 32x32/stride-32 patches (267 vs 82 ms), while a QKV MatMulInteger is 3.5x faster (16 vs 56 ms);
# - the last weight MatMul/Gemm of each tower (the output projection, one token per item: no cost).
# Tiny model, min cosine to fp32 over the whole split image/text 0.9972/0.9999 -> 0.9999/0.9999, i->t top-1
# flips 307 -> 202 of 1000; R@1 drop (i->t, t->i) 0.016/0.000 -> 0.006/0.000 in the export check, 0.014/0.002
# -> 0.008/0.001 in tests/test_export.py's batching. Over 36 draws (validation seeds x batch sizes) the
# worst-direction drop is noise of similar spread either way (mean +0.004, 2-4 draws over 0.01): dynamic
# activation scales are per batch, so the split's 1622 duplicate captions (exact ties in fp32) stop tying.
INT8_KEEP_FLOAT_OPS = ("Conv",)


def _output_projection(model: onnx.ModelProto) -> list[str]:
    """Name of the last MatMul/Gemm with a constant weight (the tower's output projection), if any."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    last = [n.name for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in consts and n.name]
    return last[-1:]


def convert_int8(src: Path, dst: Path, per_channel: bool, reduce_range: bool) -> dict:
    """Dynamic int8 weights; returns what stayed in float (for the manifest)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    op_types = [op for op in IntegerOpsRegistry if op not in INT8_KEEP_FLOAT_OPS]
    keep_float = _output_projection(onnx.load(str(src), load_external_data=False))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs advice on the root logger at WARNING
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                             reduce_range=reduce_range, op_types_to_quantize=op_types, nodes_to_exclude=keep_float)
    finally:
        root.setLevel(level)
    return {"float_op_types": list(INT8_KEEP_FLOAT_OPS), "float_nodes": keep_float}
