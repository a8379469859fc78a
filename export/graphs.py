"""The two encoder graphs: torch modules that output L2-normalised embeddings, exported to ONNX and checked.

Where the traps are (DESIGN.md §5): the MHA fast path has no ONNX op, the dynamo exporter fixes the batch at 1
for a batch-1 example, and the runtime needs a really dynamic batch axis and int64 token ids.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import onnx
import torch

from cmalign.errors import ConfigError
from cmalign.export.parity import ParityError  # a graph that fails its checks is not kept either

EXPORTERS = ("dynamo", "legacy")

# The opsets each exporter writes as asked (measured with torch 2.14, onnx 1.23, onnxruntime 1.32 on open_clip's
# ViTs). dynamo writes 18 and newer: asked for less, torch's version converter fails on these graphs and it writes
# 18 anyway, with a warning; past 25 it writes an Attention node that onnx's checker rejects. legacy (TorchScript)
# needs 14 for scaled_dot_product_attention, and torch refuses more than 23.
OPSETS = {"dynamo": (18, 25), "legacy": (14, 23)}
# From opset 23 dynamo writes ONNX's fused Attention op, which onnxruntime's quantize_dynamic turns into a
# com.microsoft QAttention node (with an is_causal attribute) that onnxruntime then refuses to load.
INT8_MAX_DYNAMO_OPSET = 22


def check_export_settings(exporter: str, opset: int, int8: bool) -> None:
    """Refuse, before any work, an exporter/opset pair that cannot give a graph at exactly that opset."""
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter '{exporter}': expected one of {', '.join(EXPORTERS)}")
    lo, hi = OPSETS[exporter]
    if not lo <= opset <= hi:
        others = [e for e, (a, b) in OPSETS.items() if e != exporter and a <= opset <= b]
        raise ConfigError(f"--opset {opset} is not supported by the {exporter} exporter (it writes opsets {lo} to "
                          f"{hi}" + (f"; --exporter {others[0]} writes opset {opset}" if others else "") +
                          "). The default, 20, is the tested one")
    if int8 and exporter == "dynamo" and opset > INT8_MAX_DYNAMO_OPSET:
        raise ConfigError(f"--int8 with --opset {opset}: from opset 23 the dynamo exporter writes ONNX's fused "
                          "Attention op, which onnxruntime's int8 quantisation turns into a graph onnxruntime "
                          f"cannot load. Use --opset {INT8_MAX_DYNAMO_OPSET} or lower with --int8 (default 20)")


class ImageEncoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=True)


class TextEncoder(torch.nn.Module):
    """open_clip pools at ``argmax`` of the int64 ids (EOT has the largest id) — no float cast, so fp16 is safe.

    With a causal mask and EOT pooling, the pooled token sees only the tokens before it: the padding after the
    longest caption's EOT changes nothing, so the runtime may cut it off (a 10-token caption costs 10/77 of the
    attention-free work and less of the attention). For such models (:attr:`trims_padding`) the graph takes any
    sequence length up to the context length: open_clip's ``CLIP.encode_text`` adds the whole positional table and
    the whole causal mask, so this forward slices both to the input's length — the same arithmetic on the kept
    positions. Other text towers keep open_clip's forward and a fixed length.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.trims_padding = trims_padding(model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.trims_padding:
            return self.model.encode_text(tokens, normalize=True)
        from open_clip.transformer import text_global_pool

        m, seq = self.model, tokens.shape[1]
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype) + m.positional_embedding[:seq].to(cast_dtype)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:seq, :seq]))
        x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
        return torch.nn.functional.normalize(x, dim=-1)


def trims_padding(model: torch.nn.Module) -> bool:
    """Whether padding after the EOT can be cut off without changing the output: open_clip's ``CLIP`` class with
    its causal mask and EOT pooling (argmax or eos), and nothing else."""
    import open_clip

    return (type(model) is open_clip.CLIP and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", None) in ("argmax", "eos")
            and getattr(model.transformer, "batch_first", True))


@contextlib.contextmanager
def _export_mode():
    # The MHA fast path exports as aten::_native_multi_head_attention, which ONNX has no op for.
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def export_graph(module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str,
                 opset: int, exporter: str, dynamic_length: bool = False) -> str:
    """Export with a dynamic batch axis (and, with ``dynamic_length``, a dynamic sequence axis up to the example's
    length: dynamo only, TorchScript bakes the traced length into its Reshape nodes); returns the exporter's console
    output (kept for the log)."""
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter '{exporter}': expected one of {', '.join(EXPORTERS)}")
    if example.shape[0] < 2:
        # The dynamo exporter silently specialises the batch axis to 1 for a batch-1 example.
        example = torch.cat([example, example])
    # One self-contained file per graph, unless protobuf's 2 GB limit forces the weights out.
    external_data = sum(p.numel() * p.element_size() for p in module.parameters()) > 1.8e9
    log = io.StringIO()
    with _export_mode(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        if exporter == "dynamo":
            axes = {0: torch.export.Dim("batch")}
            if dynamic_length:
                axes[1] = torch.export.Dim("sequence", min=2, max=example.shape[1])
            torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=[output_name],
                              opset_version=opset, dynamo=True, dynamic_shapes=(axes,),
                              external_data=external_data, verbose=False)
        else:
            torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=[output_name],
                              opset_version=opset, dynamo=False,
                              dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    return log.getvalue()


def check_graph(path: Path) -> dict:
    """onnx.checker (full) plus the two properties the runtime relies on; returns graph facts."""
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    for value in (graph.input[0], graph.output[0]):
        dim0 = value.type.tensor_type.shape.dim[0]
        if not dim0.dim_param:
            raise ParityError(f"{path.name}: the batch axis of '{value.name}' is fixed at {dim0.dim_value}, "
                              "not dynamic")
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type == "ArgMax":
            src = producers.get(node.input[0])
            if src is not None and src.op_type == "Cast":
                raise ParityError(f"{path.name}: ArgMax over a Cast ({src.name}); token ids must not be cast "
                                  "to float for pooling (breaks in fp16)")
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    return {"opset": opsets.get("ai.onnx"), "ops": sorted({n.op_type for n in graph.node}),
            "input": graph.input[0].name,
            "input_shape": [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]}
