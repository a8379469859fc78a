"""The machine's practical peak (a GEMM microbenchmark, fp32 and int8) and each runtime's achieved share of it.

    .venv/bin/python benchmarks/roofline.py [--work runs/bench-roofline] [--batches 1,8,32] [--repeats 5]
        [--profile-batch 32]

Peaks: onnxruntime's own GEMM (MLAS, the kernel the exported graphs run on) on one-node graphs, 2048 x 2048 x 2048:
``MatMul`` in fp32 and ``MatMulInteger`` (uint8 x int8, VNNI where the CPU has it) in int8, with the threads the
model sessions use; torch's fp32 ``mm`` beside them. Work per item: torch's ``FlopCounterMode`` on ViT-B-32's
image and text encoders at batch 1 (2 FLOPs a multiply-add; attention, MLP and projections — the GEMM-shaped
work that dominates). Achieved: items/s of the exported graphs (ViT-B-32 with random weights: the speed does not
depend on the values) at each batch, × FLOPs per item, as a share of the matching peak. Profile (what stops a graph
short of the peak): onnxruntime's own profiler on each fp32 graph at ``--profile-batch``, its node time summed by
operator type: the share of time in the matrix-multiply operators, and their rate (the graph's FLOPs over that
time) as a share of the peak. Results: benchmarks/results/roofline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CMALIGN = str(Path(sys.executable).parent / "cmalign")
NO_SPIN = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}
N = 2048


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _one_node(path: Path, op: str) -> Path:
    import onnx
    from onnx import TensorProto, helper

    a, b = ((TensorProto.FLOAT, TensorProto.FLOAT) if op == "MatMul" else (TensorProto.UINT8, TensorProto.INT8))
    out = TensorProto.FLOAT if op == "MatMul" else TensorProto.INT32
    inputs = [helper.make_tensor_value_info("a", a, [N, N]), helper.make_tensor_value_info("b", b, [N, N])]
    g = helper.make_graph([helper.make_node(op, ["a", "b"], ["c"])], op, inputs,
                          [helper.make_tensor_value_info("c", out, [N, N])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def gemm_peaks(work: Path, repeats: int) -> dict:
    import torch

    from cmalign.export.runtime import make_session

    flops = 2 * N**3
    rng = np.random.default_rng(0)
    out = {}
    a32, b32 = rng.standard_normal((N, N), np.float32), rng.standard_normal((N, N), np.float32)
    s = make_session(_one_node(work / "matmul_fp32.onnx", "MatMul"), config=NO_SPIN)
    out["ort_fp32_gflops"] = flops / _median_seconds(lambda: s.run(None, {"a": a32, "b": b32}), repeats) / 1e9
    a8, b8 = rng.integers(0, 255, (N, N), dtype=np.uint8), rng.integers(-127, 127, (N, N), dtype=np.int8)
    s = make_session(_one_node(work / "matmul_int8.onnx", "MatMulInteger"), config=NO_SPIN)
    out["ort_int8_gops"] = flops / _median_seconds(lambda: s.run(None, {"a": a8, "b": b8}), repeats) / 1e9
    ta, tb = torch.from_numpy(a32), torch.from_numpy(b32)
    out["torch_fp32_gflops"] = flops / _median_seconds(lambda: torch.mm(ta, tb), repeats) / 1e9
    out["threads"] = torch.get_num_threads()
    return out


def flops_per_item() -> dict:
    """FLOPs of one image and one text through ViT-B-32's encoders (torch's FlopCounterMode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cmalign.model.loading import load_model

    lm = load_model("ViT-B-32", None)
    m = lm.model.eval()
    out = {}
    # with gradients on: under no_grad nn.MultiheadAttention takes a fused fast path the counter does not see
    for tower, x, fn in (("image", torch.randn(1, 3, 224, 224), m.encode_image),
                         ("text", lm.tokenizer(["a photo of a red circle"]), m.encode_text)):
        counter = FlopCounterMode(display=False)
        with counter:
            fn(x)
        out[tower] = counter.get_total_flops()
    return out


def _export(work: Path) -> Path:
    out = work / "vit-b32-export"
    if not (out / "manifest.json").is_file():
        subprocess.run([CMALIGN, "export", "--model", "ViT-B-32", "--pretrained", "random", "--int8", "--out",
                        str(out), "--retrieval-images", "0", "-q"], check=True)
    return out


_PEAK = {"fp32": "ort_fp32_gflops", "int8": "ort_int8_gops"}


def achieved(export: Path, batches: list[int], repeats: int, flops: dict, peaks: dict) -> list[dict]:
    from cmalign.export.manifest import graph_file
    from cmalign.export.runtime import make_session

    rng = np.random.default_rng(0)
    rows = []
    for tower in ("image", "text"):
        for variant in ("fp32", "int8"):
            s = make_session(export / graph_file(tower, variant), config=NO_SPIN)
            name = s.get_inputs()[0].name
            for b in batches:
                x = (rng.standard_normal((b, 3, 224, 224), np.float32) if tower == "image"
                     else rng.integers(1, 49000, (b, 77)).astype(np.int64))
                sec = _median_seconds(lambda x=x, s=s, name=name: s.run(None, {name: x}), repeats)
                rate = b / sec
                achieved_g = rate * flops[tower] / 1e9
                peak = peaks[_PEAK[variant]]
                rows.append({"tower": tower, "variant": variant, "batch": b, "items_per_s": round(rate, 2),
                             "achieved_gflops": round(achieved_g, 1), "share_of_peak": round(achieved_g / peak, 3)})
                print(f"{tower:5s} {variant} batch {b:3d}: {rate:7.1f} items/s, {achieved_g:6.1f} G(FL)OP/s = "
                      f"{100 * achieved_g / peak:5.1f} % of the {variant} GEMM peak", flush=True)
    return rows


GEMM_OPS = ("MatMul", "Gemm", "FusedMatMul", "Conv", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
            "QGemm", "QLinearMatMul", "Attention", "QAttention", "MultiHeadAttention")


def op_profile(export: Path, batch: int, repeats: int, flops: dict, peaks: dict) -> dict:
    """Time by operator type in each fp32 graph at ``batch`` (onnxruntime's profiler, the sessions' own options)."""
    import onnxruntime as ort

    from cmalign.export.manifest import graph_file

    rng = np.random.default_rng(0)
    out = {}
    for tower in ("image", "text"):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for key, value in NO_SPIN.items():
            so.add_session_config_entry(key, value)
        so.enable_profiling = True
        so.profile_file_prefix = str(export.parent / f"profile-{tower}")
        s = ort.InferenceSession(str(export / graph_file(tower, "fp32")), so, providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        x = (rng.standard_normal((batch, 3, 224, 224), np.float32) if tower == "image"
             else rng.integers(1, 49000, (batch, 77)).astype(np.int64))
        s.run(None, {name: x})  # first run: allocations
        t0 = time.perf_counter()
        for _ in range(repeats):
            s.run(None, {name: x})
        wall = (time.perf_counter() - t0) / repeats
        events = json.loads(Path(s.end_profiling()).read_text())
        by_op: dict[str, float] = {}
        runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                op = e.get("args", {}).get("op_name", "?")
                by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e6
        node_s = sum(by_op.values())
        gemm_s = sum(v for k, v in by_op.items() if k in GEMM_OPS)
        run_s = sum(e["dur"] for e in runs) / 1e6
        graph_flops = flops[tower] * batch * len(runs)
        top = sorted(by_op.items(), key=lambda kv: -kv[1])[:8]
        out[tower] = {"batch": batch, "runs": len(runs), "wall_s_per_run": round(wall, 4),
                      "node_time_share_matmul": round(gemm_s / node_s, 3),
                      "matmul_rate_share_of_peak": round(graph_flops / gemm_s / 1e9 / peaks["ort_fp32_gflops"], 3),
                      "graph_rate_share_of_peak": round(graph_flops / run_s / 1e9 / peaks["ort_fp32_gflops"], 3),
                      "node_time_outside_nodes_share": round(1 - node_s / run_s, 3),
                      "top_ops_share": {k: round(v / node_s, 3) for k, v in top}}
        print(f"{tower} fp32 batch {batch} profile: matrix multiplies {100 * gemm_s / node_s:.0f} % of node time at "
              f"{100 * out[tower]['matmul_rate_share_of_peak']:.0f} % of the peak; graph "
              f"{100 * out[tower]['graph_rate_share_of_peak']:.0f} %; top: " +
              ", ".join(f"{k} {100 * v / node_s:.0f} %" for k, v in top), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/bench-roofline")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile-batch", type=int, default=32, help="batch of the operator profile (0: none)")
    ap.add_argument("--result", default=str(Path(__file__).parent / "results" / "roofline.json"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    peaks = gemm_peaks(work, args.repeats)
    print(json.dumps(peaks), flush=True)
    flops = flops_per_item()
    print(f"FLOPs per item: image {flops['image'] / 1e9:.2f} G, text {flops['text'] / 1e9:.2f} G", flush=True)
    export = _export(work)
    # The peak is measured again after the graphs and the higher of the two kept: on this shared machine a
    # neighbour's load during one measurement would otherwise put graphs above "the peak".
    rows = achieved(export, [int(b) for b in args.batches.split(",")], args.repeats, flops, peaks)
    again = gemm_peaks(work, args.repeats)
    print(json.dumps(again), flush=True)
    peaks = {k: max(peaks[k], again[k]) for k in peaks}
    for r in rows:
        r["share_of_peak"] = round(r["achieved_gflops"] / peaks[_PEAK[r["variant"]]], 3)
    print("shares of the higher peak: " + ", ".join(f"{r['tower']} {r['variant']} {r['batch']}: "
                                                     f"{100 * r['share_of_peak']:.0f} %" for r in rows), flush=True)
    profile = op_profile(export, args.profile_batch, args.repeats, flops, peaks) if args.profile_batch else None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    result = {"benchmark": "roofline", "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
              "machine": f"{os.cpu_count()} CPU cores ({cpu}), {platform.platform()}", "peaks": peaks,
              "peaks_note": "measured before and after the graphs, the higher kept",
              "flops_per_item": flops, "rows": rows,
              "profile": profile}
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
