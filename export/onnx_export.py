"""Export a fitted (or plain open_clip) model as two ONNX encoders, checked before anything is kept.

`export_model` writes into a temporary directory next to ``out`` and renames it into place only
after every graph has passed ``onnx.checker`` (full check), has a really dynamic batch axis, and
matches torch eager on generated validation images and captions at batch 1, 3 and 32 within the
bounds in :mod:`cmalign.export.manifest`. A failure raises :class:`ParityError` with the figures and
leaves ``out`` as it was. The graphs (:mod:`.graphs`), their fp16/int8 variants (:mod:`.precision`) and the
checks against torch (:mod:`.parity`) are the torch side of the package; the runtime, preprocessing and
tokenizer that production loads never import torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import torch

import cmalign
import cmalign.export.manifest as mf
from cmalign.artifacts import sources
from cmalign.artifacts.atomic import atomic_dir, write_json
from cmalign.artifacts.outputs import check_output
from cmalign.errors import ConfigError, MissingInputError
from cmalign.export.graphs import ImageEncoder, TextEncoder, check_export_settings, check_graph, export_graph
from cmalign.export.parity import (
    PARITY_BATCHES,
    ParityError,
    graph_parity,
    parity_inputs,
    pipeline_parity,
    retrieval_r1,
)
from cmalign.export.precision import INT8_KEEP_FLOAT_OPS, convert_fp16, convert_int8
from cmalign.export.preprocess import save_preprocess
from cmalign.export.tokenizer import save_tokenizer, trim_padding
from cmalign.model.base import BASE_TAG, resolve_pretrained


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


# -- sources ------------------------------------------------------------------------------------------

def model_source(cfg: ExportConfig) -> tuple[str, str | None, dict]:
    """(open_clip model name, pretrained, provenance for the manifest) from a run, a model dir or a name."""
    if bool(cfg.source) == bool(cfg.model):
        raise ConfigError("give either a source directory (a `cmalign fit` run or an open_clip local-dir model) "
                         "or --model NAME [--pretrained TAG|PATH], not both or neither")
    if cfg.model:
        pretrained = cfg.pretrained
        if pretrained in (BASE_TAG, "random"):  # the embedded base (built and cached on first use) or no weights,
            pretrained = resolve_pretrained(cfg.model, pretrained)  # as fit and eval take them
        return cfg.model, pretrained, {"kind": "open_clip", "model": cfg.model, "pretrained": cfg.pretrained,
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
    check_export_settings(cfg.exporter, cfg.opset, cfg.int8)
    check_output(out, mf.KIND, inputs=[cfg.source, cfg.pretrained], overwrite=cfg.overwrite)
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

    # The legacy (TorchScript) exporter bakes the traced sequence length into its Reshape constants: its text
    # graphs keep the fixed context length.
    cut_padding = modules["text"].trims_padding and cfg.exporter == "dynamo"
    graphs: dict[str, dict] = {}
    facts = {}
    int8_float = {}
    for tower in mf.TOWERS:
        path = tmp / mf.graph_file(tower, "fp32")
        log(f"exporting the {tower} encoder ({cfg.exporter}, opset {cfg.opset})")
        export_graph(modules[tower], torch.from_numpy(arrays[tower][:2]), path, input_names[tower],
                     output_names[tower], cfg.opset, cfg.exporter,
                     dynamic_length=tower == "text" and cut_padding)
        facts[tower] = check_graph(path)
        if facts[tower]["opset"] != cfg.opset:  # an exporter may fall back to another opset with only a warning
            raise ConfigError(f"the {cfg.exporter} exporter wrote the {tower} encoder at opset "
                              f"{facts[tower]['opset']}, not the --opset {cfg.opset} asked for; nothing was written")
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
            if tower == "text" and cut_padding:  # as the runtime runs it: padding cut off
                cut = trim_padding(arrays["text"])
                trimmed = graph_parity(path, variant, cut, reference["text"])
                parity = {**parity, "trimmed": {"length": int(cut.shape[1]), **trimmed},
                          "min_cosine": min(parity["min_cosine"], trimmed["min_cosine"])}
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
