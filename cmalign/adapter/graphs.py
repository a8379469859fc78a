"""The adapter in ONNX, fused into a derived export of the base: `embed`, `index`, `search` and `serve` then run
the aligned space with no new moving parts.

The adapter graph is a handful of ops (MatMul, Add, the MLP's tanh GELU, a clamped L2 normalisation) built with
``onnx.helper`` from the numpy weights rather than exported from torch: attaching an adapter to an export then needs
no torch, and the ops used (ReduceSum with an axes input, opset 13+) exist at every opset the exports are written
at. ``onnx.compose`` joins it behind each graph of the base (every variant: fp32, fp16, int8 — the adapter itself
stays fp32), and every fused graph is checked against the base graph + the numpy map on generated images and
captions, as an export's graphs are checked against torch.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

import cmalign
from cmalign.adapter.weights import GELU_C, AdapterWeights
from cmalign.artifacts.atomic import atomic_dir, write_json
from cmalign.artifacts.checksums import sha256_file
from cmalign.export import manifest as mf
from cmalign.metrics.vectors import row_cosines

UNADAPTED = "/unadapted"  # suffix given to the base graph's output inside a fused graph


def adapter_model(weights: AdapterWeights, tower: str, base, out_name: str) -> object:
    """A graph ``out_name + UNADAPTED (batch, d) -> out_name (batch, d)`` for one tower, with the base model's
    opsets and IR version."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    a, p = weights.arrays, f"adapter.{tower}."
    inp = out_name + UNADAPTED
    d = a[f"{tower}.bias"].shape[0]
    inits = [numpy_helper.from_array(a[f"{tower}.bias"], p + "bias"),
             numpy_helper.from_array(np.array([-1], np.int64), p + "axes"),
             numpy_helper.from_array(np.array(1e-24, np.float32), p + "eps2")]  # (1e-12)², F.normalize's eps
    if f"{tower}.w1" in a:  # residual MLP, GELU in its tanh form (as weights.gelu_tanh and the torch model)
        inits += [numpy_helper.from_array(a[f"{tower}.{k}"], p + k) for k in ("w1", "b1", "w2")]
        inits += [numpy_helper.from_array(np.array(v, np.float32), p + k)
                  for k, v in (("c", GELU_C), ("k", 0.044715), ("half", 0.5), ("one", 1.0))]
        nodes = [helper.make_node(op, ins, [outp], name=p + outp.split(".")[-1]) for op, ins, outp in (
            ("MatMul", [inp, p + "w1"], p + "h0"), ("Add", [p + "h0", p + "b1"], p + "h"),
            ("Mul", [p + "h", p + "h"], p + "h2"), ("Mul", [p + "h2", p + "h"], p + "h3"),
            ("Mul", [p + "h3", p + "k"], p + "h3k"), ("Add", [p + "h", p + "h3k"], p + "inner"),
            ("Mul", [p + "inner", p + "c"], p + "scaled"), ("Tanh", [p + "scaled"], p + "tanh"),
            ("Add", [p + "tanh", p + "one"], p + "gate"), ("Mul", [p + "h", p + "gate"], p + "hg"),
            ("Mul", [p + "hg", p + "half"], p + "gelu"), ("MatMul", [p + "gelu", p + "w2"], p + "delta"))]
    elif f"{tower}.weight" in a:
        inits.append(numpy_helper.from_array(a[f"{tower}.weight"], p + "weight"))
        nodes = [helper.make_node("MatMul", [inp, p + "weight"], [p + "delta"], name=p + "matmul")]
    else:
        inits += [numpy_helper.from_array(a[f"{tower}.down"], p + "down"),
                  numpy_helper.from_array(a[f"{tower}.up"], p + "up")]
        nodes = [helper.make_node("MatMul", [inp, p + "down"], [p + "low"], name=p + "matmul_down"),
                 helper.make_node("MatMul", [p + "low", p + "up"], [p + "delta"], name=p + "matmul_up")]
    nodes += [
        helper.make_node("Add", [inp, p + "delta"], [p + "residual"], name=p + "add_residual"),
        helper.make_node("Add", [p + "residual", p + "bias"], [p + "y"], name=p + "add_bias"),
        helper.make_node("Mul", [p + "y", p + "y"], [p + "sq"], name=p + "square"),
        helper.make_node("ReduceSum", [p + "sq", p + "axes"], [p + "norm2"], keepdims=1, name=p + "sum"),
        helper.make_node("Max", [p + "norm2", p + "eps2"], [p + "norm2_safe"], name=p + "clamp"),
        helper.make_node("Sqrt", [p + "norm2_safe"], [p + "norm"], name=p + "sqrt"),
        helper.make_node("Div", [p + "y", p + "norm"], [out_name], name=p + "normalise"),
    ]
    graph = helper.make_graph(nodes, f"cmalign_adapter_{tower}",
                              [helper.make_tensor_value_info(inp, TensorProto.FLOAT, ["batch", d])],
                              [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", d])], inits)
    default = [o for o in base.opset_import if o.domain in ("", "ai.onnx")]
    model = helper.make_model(graph, opset_imports=default, ir_version=base.ir_version,
                              producer_name="cmalign", producer_version=cmalign.__version__)
    onnx.checker.check_model(model)
    return model


def fuse(base_path: Path, weights: AdapterWeights, tower: str, out_path: Path) -> None:
    """The base graph with the tower's adapter behind it; the output keeps the base output's name."""
    import onnx
    from onnx import compose

    base = onnx.load(str(base_path))
    name = base.graph.output[0].name
    for node in base.graph.node:  # the base's output becomes an inner value feeding the adapter
        for i, o in enumerate(node.output):
            if o == name:
                node.output[i] = name + UNADAPTED
    base.graph.output[0].name = name + UNADAPTED
    fused = compose.merge_models(base, adapter_model(weights, tower, base, name),
                                 io_map=[(name + UNADAPTED, name + UNADAPTED)])
    onnx.checker.check_model(fused)
    onnx.save(fused, str(out_path))


def _parity_inputs(base_dir: Path, n: int = 16) -> dict[str, np.ndarray]:
    from cmalign.data.synth import synth_split
    from cmalign.export.runtime import load_export

    model = load_export(base_dir, verify=False)
    records = synth_split("val", n_images=n, captions_per_image=1).records
    return {"image": model.preprocess([r.image.load() for r in records]),
            "text": model.tokenize([r.caption for r in records])}


def _run(path: Path, x: np.ndarray, variant: str) -> np.ndarray:
    from cmalign.export.runtime import default_optimization, make_session

    s = make_session(path, optimization=default_optimization(variant, "cpu"))  # the level the runtime uses
    return np.asarray(s.run(None, {s.get_inputs()[0].name: x})[0], np.float32)


def derive_export(base_dir: str | Path, adapter_dir: str | Path, out: str | Path, adapter_manifest: dict,
                  log=lambda msg: None) -> dict:
    """Write ``out``: the base export with the adapter fused into its graphs; returns its manifest.

    Refused (nothing written) when a fused graph's output differs from the base graph followed by the numpy map by
    more than the variant's parity bound.
    """
    from cmalign.export.parity import ParityError

    base_dir, out = Path(base_dir), Path(out)
    base = mf.read_manifest(base_dir)
    weights = AdapterWeights.load(adapter_dir)
    inputs = _parity_inputs(base_dir)
    graphs: dict[str, dict] = {}
    with atomic_dir(out) as tmp:
        shutil.copy2(base_dir / mf.PREPROCESS, tmp / mf.PREPROCESS)
        shutil.copytree(base_dir / mf.TOKENIZER_DIR, tmp / mf.TOKENIZER_DIR)
        for variant, towers in base["graphs"].items():
            graphs[variant] = {}
            for tower in mf.TOWERS:
                src = base_dir / towers[tower].get("file", mf.graph_file(tower, variant))
                dst = tmp / mf.graph_file(tower, variant)
                if tower in weights.towers:
                    log(f"fusing the {tower} adapter into the {variant} {tower} graph")
                    fuse(src, weights, tower, dst)
                else:
                    shutil.copy2(src, dst)  # unchanged (a query adapter leaves the image graph as it is)
                expected = weights.apply(tower, _run(src, inputs[tower], variant))
                got = _run(dst, inputs[tower], variant)
                cos = float(row_cosines(expected, got).min())
                bound = mf.MIN_COSINE["fp32"]  # against its own base variant: only the fp32 adapter ops differ
                if not cos >= bound:
                    raise ParityError(f"{tower} graph ({variant}) with the adapter: min cosine {cos:.7f} to the base "
                                      f"graph + the adapter in numpy, below {bound}; nothing was written")
                graphs[variant][tower] = {**towers[tower], "file": dst.name, "sha256": sha256_file(dst),
                                          "bytes": dst.stat().st_size,
                                          "adapter_parity": {"min_cosine": cos, "bound": bound,
                                                             "inputs": f"{len(inputs[tower])} generated"}}
        manifest = {**base, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cmalign_version": cmalign.__version__,
                    "graphs": graphs,
                    "adapter": {"path": str(Path(adapter_dir).resolve()), "kind": adapter_manifest["adapter_kind"],
                                "config_hash": adapter_manifest["config_hash"],
                                "weights_sha256": sha256_file(Path(adapter_dir) / "adapter.npz"),
                                "base_export": str(base_dir.resolve()), "base_fingerprint": base["fingerprint"]},
                    "retrieval": {}}  # the base's check says nothing about the adapted graphs
        manifest["fingerprint"] = mf.fingerprint(tmp)
        write_json(tmp / mf.MANIFEST, manifest)
    return manifest
