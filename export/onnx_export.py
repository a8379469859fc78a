"""Export a fitted (or plain open_clip) model as two ONNX encoders, checked before anything is kept.

`export_model` writes into a temporary directory next to ``out`` and renames it into place only
after every graph has passed ``onnx.checker`` (full check), has a really dynamic batch axis, and
matches torch eager on generated validation images and captions at batch 1, 3 and 32 within the
bounds in :mod:`cmalign.export.manifest`. A failure raises :class:`ParityError` with the figures and
leaves ``out`` as it was. This is the only module of the package that imports torch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

import cmalign
import cmalign.export.manifest as mf
from cmalign.artifacts import sources
from cmalign.artifacts.atomic import atomic_dir, write_json
from cmalign.errors import CmalignError, ConfigError, MissingInputError, OutputExistsError
from cmalign.export.preprocess import ImagePreprocessor, save_preprocess
from cmalign.export.runtime import default_optimization, make_session
from cmalign.export.tokenizer import ClipTokenizer, save_tokenizer
from cmalign.metrics.vectors import l2_normalize

PARITY_BATCHES = (1, 3, 32)
EXPORTERS = ("dynamo", "legacy")


class ParityError(CmalignError, RuntimeError):
    """An exported graph does not reproduce torch eager closely enough; nothing was written."""


@dataclass
class ExportConfig:
    source: str | None = None  # a `cmalign fit` run directory or an open_clip local-dir model directory
    model: str | None = None  # ...or an open_clip model name (unaligned baseline)
    pretrained: str | None = None  # tag or checkpoint file, with `model`
    out: str = "exports/model"
    fp16: bool = False
    int8: bool = False
    int8_per_channel: bool = True  # onnxruntime's advice for transformers; within 0.002 of per-tensor here
    # 7-bit weights: without AVX-512 VNNI, onnxruntime's u8×s8 kernels can saturate their 16-bit
    # intermediate sums. Measured on ViT-B-32 (AVX2): min cosine 0.980 → 0.999, speed 1.58× → 1.40× fp32.
    int8_reduce_range: bool = True
    opset: int = 20
    exporter: str = "dynamo"
    # Generated validation images for the R@1 check of each variant (0 skips it). The whole split: with
    # 200 images one image is 0.5 points, and int8-vs-fp32 differences of 1.5 points were noise (measured).
    retrieval_images: int = 1000
    overwrite: bool = False


@dataclass
class ExportResult:
    out: Path
    manifest: dict
    seconds: float
    variants: list[str] = field(default_factory=list)


# -- the graphs ---------------------------------------------------------------------------------------

class ImageEncoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=True)


class TextEncoder(torch.nn.Module):
    """open_clip pools at ``argmax`` of the int64 ids (EOT has the largest id) — no float cast, so fp16 is safe."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)


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
                 opset: int, exporter: str) -> str:
    """Export with a dynamic batch axis; returns the exporter's console output (kept for the log)."""
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
            torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=[output_name],
                              opset_version=opset, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
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


# -- parity -------------------------------------------------------------------------------------------

@dataclass
class ParityInputs:
    """Generated validation images and captions, as torch sees them and as the runtime does."""

    pixels: torch.Tensor
    tokens: torch.Tensor
    images: list  # PIL images
    captions: list[str]


def parity_inputs(preprocess_val: Callable, tokenizer: Callable, n: int = max(PARITY_BATCHES)) -> ParityInputs:
    from cmalign.data.synth import synth_split

    records = synth_split("val", n_images=n, captions_per_image=1).records
    images = [r.image.load().convert("RGB") for r in records]
    captions = [r.caption for r in records]
    return ParityInputs(pixels=torch.stack([preprocess_val(im) for im in images]), tokens=tokenizer(captions),
                        images=images, captions=captions)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((l2_normalize(a, dtype=np.float64) * l2_normalize(b, dtype=np.float64)).sum(1).min())


def graph_parity(path: Path, variant: str, x: np.ndarray, reference: np.ndarray) -> dict:
    """Min cosine per batch size of the ORT graph (as the runtime runs it on CPU) against torch eager."""
    session = make_session(path, optimization=default_optimization(variant, "cpu"))
    name = session.get_inputs()[0].name
    out = {}
    for bs in PARITY_BATCHES:
        got = np.concatenate([session.run(None, {name: x[i:i + bs]})[0] for i in range(0, len(x), bs)])
        if got.shape != reference.shape:
            raise ParityError(f"{path.name}: output shape {got.shape} at batch {bs}, expected {reference.shape}")
        out[f"batch_{bs}"] = _min_cosine(got.astype(np.float32), reference)
    out["min_cosine"] = min(out.values())
    out["max_abs_diff"] = float(np.abs(got.astype(np.float32) - reference).max())
    return out


def pipeline_parity(export_dir: Path, inputs: ParityInputs) -> dict:
    """The torch-free preprocessing and tokenizer against open_clip's, on the same inputs."""
    pre = ImagePreprocessor.from_file(export_dir / mf.PREPROCESS).batch(inputs.images)
    tok = ClipTokenizer.from_dir(export_dir / mf.TOKENIZER_DIR)(inputs.captions)
    return {"preprocess_max_abs_diff": float(np.abs(pre - inputs.pixels.numpy()).max()),
            "tokens_equal": bool(np.array_equal(tok, inputs.tokens.numpy()))}


def retrieval_r1(export_dir: Path, variant: str, n_images: int) -> dict:
    """i→t / t→i R@1 of one variant's graphs on the generated validation split (5 captions per image),
    scored exactly as `fit`'s guard scores the torch model."""
    from cmalign.data.pair_set import PairSet
    from cmalign.data.synth import synth_split
    from cmalign.train.guard import recall_at_1

    guard = PairSet.from_records(synth_split("val", n_images=n_images).records, (), max_images=n_images)
    pre = ImagePreprocessor.from_file(export_dir / mf.PREPROCESS)
    tok = ClipTokenizer.from_dir(export_dir / mf.TOKENIZER_DIR)
    emb = {}
    for tower, batches in (("image", [pre.batch([r.image.load() for r in guard.images[i:i + 64]])
                                      for i in range(0, len(guard.images), 64)]),
                           ("text", [tok(guard.captions[i:i + 256]) for i in range(0, len(guard.captions), 256)])):
        session = make_session(export_dir / mf.graph_file(tower, variant),
                               optimization=default_optimization(variant, "cpu"))
        name = session.get_inputs()[0].name
        emb[tower] = np.concatenate([session.run(None, {name: b})[0] for b in batches]).astype(np.float32)
    i2t, t2i = recall_at_1(emb, guard)
    return {"r1_i2t": i2t, "r1_t2i": t2i, "images": len(guard.images), "captions": len(guard.captions)}


# -- sources ------------------------------------------------------------------------------------------

def model_source(cfg: ExportConfig) -> tuple[str, str | None, dict]:
    """(open_clip model name, pretrained, provenance for the manifest) from a run, a model dir or a name."""
    if bool(cfg.source) == bool(cfg.model):
        raise ConfigError("give either a source directory (a `cmalign fit` run or an open_clip local-dir model) "
                         "or --model NAME [--pretrained TAG|PATH], not both or neither")
    if cfg.model:
        return cfg.model, cfg.pretrained, {"kind": "open_clip", "model": cfg.model, "pretrained": cfg.pretrained,
                                           "alpha_target": None}
    if cfg.pretrained:
        raise ConfigError("--pretrained goes with --model; a run or model directory carries its own weights")
    try:
        source = sources.resolve_source(cfg.source)
    except sources.SourceError as e:
        raise MissingInputError(str(e)) from None
    if source.kind == sources.RUN:
        m, summary = source.manifest, _read_json(source.path / "summary.json")
        info = {"kind": "cmalign-run", "run_dir": str(source.path.resolve()), "model": m.get("model"),
                "pretrained": m.get("pretrained"), "alpha_target": m.get("alpha_target"),
                "config_hash": m.get("config_hash"), "steps": m.get("steps"),
                "gaps": {k: _gap_figures(summary.get(k, {})) for k in ("before", "after") if summary.get(k)}}
        return source.open_clip_name, None, info
    if source.kind == sources.MODEL:
        return source.open_clip_name, None, {"kind": "local-dir", "model_dir": str(source.path.resolve()),
                                             "alpha_target": source.manifest.get("alpha_target"),
                                             "config_hash": source.manifest.get("config_hash")}
    raise ConfigError(f"{source.path} is already an ONNX export; give the run (or model directory) it was exported "
                      f"from: {source.manifest.get('source', {}).get('run_dir') or 'see its manifest.json'}")


def _read_json(path: Path) -> dict:
    return mf.read_json_object(path) if path.is_file() else {}  # a run's summary is optional


def _gap_figures(report: dict) -> dict:
    keep = ("raw", "centroid", "paired_residual", "mmd2", "bures", "rmg", "r1_i2t", "r1_t2i", "zeroshot_top1")
    return {k: report[k] for k in keep if k in report}


# -- the whole export ---------------------------------------------------------------------------------

def export_model(cfg: ExportConfig, log: Callable[[str], None] = lambda msg: None) -> ExportResult:
    """Export, check and validate; rename into ``cfg.out`` only when every graph passed."""
    from cmalign.model.loading import load_model

    t0 = time.time()
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it")
    model_name, pretrained, provenance = model_source(cfg)
    log(f"loading {model_name}" + (f" ({pretrained})" if pretrained else ""))
    loaded = load_model(model_name, pretrained)
    model = loaded.model.eval()
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise ConfigError(f"{model_name}: not a CLIP-style model with encode_image/encode_text")

    with atomic_dir(out) as tmp:
        manifest = _build(cfg, model, loaded, model_name, pretrained, provenance, tmp, log)
        write_json(tmp / mf.MANIFEST, manifest)
    return ExportResult(out=out, manifest=manifest, seconds=time.time() - t0, variants=list(manifest["graphs"]))


def _build(cfg, model, loaded, model_name, pretrained, provenance, tmp: Path, log) -> dict:
    tokenizer_info = save_tokenizer(loaded.tokenizer, tmp / mf.TOKENIZER_DIR)
    save_preprocess(loaded.preprocess_cfg, tmp)
    inputs = parity_inputs(loaded.preprocess_val, loaded.tokenizer)
    with torch.no_grad():
        reference = {"image": ImageEncoder(model)(inputs.pixels).numpy(),
                     "text": TextEncoder(model)(inputs.tokens).numpy()}
    arrays = {"image": inputs.pixels.numpy(), "text": inputs.tokens.numpy()}
    modules = {"image": ImageEncoder(model).eval(), "text": TextEncoder(model).eval()}
    # HF CLIP's names; distinct from every value name inside the graphs (the dynamo exporter reuses
    # names such as "embedding" internally, and a clash breaks SSA form).
    input_names = {"image": "pixel_values", "text": "input_ids"}
    output_names = {"image": "image_embeds", "text": "text_embeds"}

    graphs: dict[str, dict] = {}
    facts = {}
    int8_float = {}
    for tower in mf.TOWERS:
        path = tmp / mf.graph_file(tower, "fp32")
        log(f"exporting the {tower} encoder ({cfg.exporter}, opset {cfg.opset})")
        export_graph(modules[tower], torch.from_numpy(arrays[tower][:2]), path, input_names[tower],
                     output_names[tower], cfg.opset, cfg.exporter)
        facts[tower] = check_graph(path)
    variants = ["fp32"] + (["fp16"] if cfg.fp16 else []) + (["int8"] if cfg.int8 else [])
    for variant in variants:
        graphs[variant] = {}
        for tower in mf.TOWERS:
            path = tmp / mf.graph_file(tower, variant)
            if variant == "fp16":
                convert_fp16(tmp / mf.graph_file(tower, "fp32"), path)
                check_graph(path)
            elif variant == "int8":
                int8_float[tower] = convert_int8(tmp / mf.graph_file(tower, "fp32"), path, cfg.int8_per_channel,
                                                 cfg.int8_reduce_range)
                check_graph(path)
            log(f"checking {tower} {variant} against torch at batch {', '.join(map(str, PARITY_BATCHES))}")
            parity = graph_parity(path, variant, arrays[tower], reference[tower])
            bound = mf.MIN_COSINE[variant]
            if not parity["min_cosine"] >= bound:
                worst = min(PARITY_BATCHES, key=lambda b: parity[f"batch_{b}"])
                raise ParityError(
                    f"{tower} encoder ({variant}): min cosine to torch eager {parity['min_cosine']:.7f} at batch "
                    f"{worst}, below the bound {bound} (short by {bound - parity['min_cosine']:.2e}); "
                    "nothing was written"
                )
            graphs[variant][tower] = {"file": path.name, "sha256": mf.sha256_file(path),
                                      "bytes": path.stat().st_size,
                                      "dtype": "float16 inside, float32 io" if variant == "fp16" else
                                      ("int8 weights (dynamic quantisation), float32 io" if variant == "int8"
                                       else "float32"),
                                      "parity": {**parity, "bound": bound}}
    retrieval = {}
    if cfg.retrieval_images:
        for variant in variants:
            log(f"retrieval check of {variant} on {cfg.retrieval_images} generated validation images")
            retrieval[variant] = retrieval_r1(tmp, variant, cfg.retrieval_images)
        if "int8" in retrieval:
            drop = max(retrieval["fp32"][k] - retrieval["int8"][k] for k in ("r1_i2t", "r1_t2i"))
            retrieval["int8"]["max_drop_vs_fp32"] = drop
            retrieval["int8"]["bound_enforced"] = cfg.retrieval_images >= mf.INT8_R1_MIN_IMAGES
            if drop > mf.INT8_MAX_R1_DROP and retrieval["int8"]["bound_enforced"]:
                raise ParityError(f"int8 graphs lose {drop:.3f} R@1 against fp32 on the generated validation split "
                                  f"(bound {mf.INT8_MAX_R1_DROP}); nothing was written. Export without --int8, or "
                                  "try --int8-per-tensor")
    embed_dim = int(reference["image"].shape[1])
    size = loaded.preprocess_cfg.get("size")
    return {
        "kind": mf.KIND,
        "format_version": mf.FORMAT_VERSION,
        "cmalign_version": cmalign.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {**provenance, "open_clip_name": model_name, "pretrained": pretrained},
        "alpha_target": provenance.get("alpha_target"),
        "config_hash": provenance.get("config_hash"),
        "embed_dim": embed_dim,
        "image_size": list(size) if isinstance(size, (list, tuple)) else [size, size],  # [h, w]
        "context_length": tokenizer_info["context_length"],
        "model_cfg": loaded.model_cfg,
        "exporter": cfg.exporter,
        "opset": facts["image"]["opset"],
        "inputs": {t: {"name": facts[t]["input"], "shape": facts[t]["input_shape"],
                       "dtype": "float32" if t == "image" else "int64"} for t in mf.TOWERS},
        "outputs": {t: {"name": output_names[t], "shape": ["batch", embed_dim], "dtype": "float32",
                        "l2_normalised": True} for t in mf.TOWERS},
        "text_pooling": "argmax over int64 token ids (EOT has the largest id)",
        "preprocess": mf.PREPROCESS,
        "tokenizer": {"dir": mf.TOKENIZER_DIR, **tokenizer_info},
        "graphs": graphs,
        "parity": {"inputs": f"{len(arrays['image'])} generated validation images and captions",
                   "batch_sizes": list(PARITY_BATCHES), "reference": "torch eager fp32, CPU",
                   "bounds_min_cosine": {v: mf.MIN_COSINE[v] for v in variants},
                   "pipeline": pipeline_parity(tmp, inputs)},
        "retrieval": retrieval,
        "int8": {"per_channel": cfg.int8_per_channel, "reduce_range": cfg.int8_reduce_range,
                 "float_op_types": list(INT8_KEEP_FLOAT_OPS),
                 "float_nodes": {t: v["float_nodes"] for t, v in int8_float.items()}} if cfg.int8 else None,
        "fingerprint": mf.fingerprint(tmp),
        "versions": _versions(),
        "settings": asdict(cfg),
    }


def _versions() -> dict:
    import onnxruntime
    import open_clip

    return {"torch": torch.__version__, "open_clip": getattr(open_clip, "__version__", "unknown"),
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
