"""Everything GPU-specific in one run (≤ 8 min on one GPU), written up as JSON + markdown.

    .venv/bin/python benchmarks/gpu_check.py --dry-run        # any machine: imports, arguments, the plan
    .venv/bin/python benchmarks/gpu_check.py                  # a CUDA machine: every section
    .venv/bin/python benchmarks/gpu_check.py --sections onnx,faiss --out /tmp/gpu_check

Sections (each runs on its own, with its own time budget; one that fails does not stop the others):

  fit    50 `fit` steps of ViT-B-32 (random weights: nothing here downloads weights) with bf16 and fp16 AMP on
         CUDA: steps/s, finite losses, the run really on CUDA at that precision; then each run resumed from its
         half-way checkpoint, which must retrace the straight run (same loss at the first resumed step, final
         weights within a small share of the resumed steps' update).
  onnx   the export of that ViT-B-32 (fp32 + fp16) on onnxruntime's CUDA provider: sessions really on CUDA (and
         no compute node placed on the CPU, read from onnxruntime's profile), parity with torch CUDA eager fp32
         (TF32 off) at batch 1/32/256 (fp32 min cosine ≥ 0.99999, fp16 ≥ 0.999), and throughput against torch
         CUDA eager (fp32; fp16 autocast) at the same batches, host arrays in and out for both.
  embed  `cmalign embed --provider cuda` as a user runs it (a torch-free process): the shard must record
         CUDAExecutionProvider, and its vectors match the CPU provider's.
  faiss  faiss GPU build + search against the CPU on clustered 512-d vectors (Flat and IVF-Flat, built and tuned
         as `cmalign index` does): recall@10 against exact search and QPS.
  serve  `cmalign index --gpu` on the embedded corpus, `cmalign search --provider cuda --gpu`, then
         `cmalign serve --provider cuda --gpu` under a short load: every answer 200, the served export on CUDA.

A CUDA provider that falls back to the CPU fails its section with a message saying so; nothing is skipped
silently. Without a CUDA device a real run stops at once ("no CUDA device: ..."), non-zero. ``--dry-run`` needs no
GPU: it imports what the sections need, checks the arguments, the fit config keys and the CLI options the script
passes, prints the plan and what would fail on this machine, and exits 0 when the script's own plan is valid.

Results: ``--out`` (default benchmarks/results/gpu_check) + ``.json`` and ``.md``, rewritten after each section.
The section budgets are estimates (written without a GPU at hand); each run's report has the measured seconds.
Exit status: 0 every section passed; 1 a section failed, or no CUDA device; 2 bad arguments or an invalid plan.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import http.client
import importlib
import io
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "gpu_check"
CLI = [sys.executable, "-m", "cmalign.cli.main"]  # the `cmalign` command of this interpreter
# What the sections run on. Constants, so that the code paths can be walked on a CPU by a scratch harness that sets
# them to cpu / CPUExecutionProvider / cmalign-tiny; a real run never changes them.
MODEL = "ViT-B-32"
PROVIDER = "cuda"  # onnxruntime provider name as cmalign takes it
CUDA_EP = "CUDAExecutionProvider"
FAISS_GPU = ["--gpu"]  # the faiss GPU flag of `cmalign index/search/serve`
TIME_LIMIT_S = 480  # the 8 minutes on one GPU
PARITY_BOUNDS = {"fp32": 0.99999, "fp16": 0.999}  # min cosine to torch fp32, as the export's own bounds
PRECISIONS = {"bf16": "amp_bf16", "fp16": "amp"}  # fit's --precision names
OWN_MODULES = ("cmalign", "index_benchmark")  # an import failure there is the script's plan gone stale
# A resumed run's first step sees the same weights and batch as the straight run's: only kernel nondeterminism
# may separate them. Its final weights may differ from the straight run's by atomics in the backward passes,
# a small share of what the resumed steps changed (a wrong data position or lost optimizer state is ~100 %).
RESUME_FIRST_STEP_REL = 1e-4
RESUME_WEIGHT_SHARE = 0.25
# onnxruntime puts shape arithmetic on the CPU on purpose; a node on the CPU of one of these kinds, or on tensors
# this large (at batch 2), is real compute that fell back.
HEAVY_OPS = {"MatMul", "Gemm", "Conv", "FusedMatMul", "Attention", "MultiHeadAttention", "Softmax",
             "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "Gelu", "FastGelu",
             "BiasGelu", "QuickGelu", "Einsum"}
LARGE_ELEMENTS = 4096
METADATA_OPS = {"Shape", "Size"}  # read only a tensor's shape, whatever its size


@dataclass
class Plan:
    name: str
    budget_s: int
    what: str
    needs: tuple[str, ...]  # modules the section imports ("pkg" or "pkg:Name")
    gpu_needs: tuple[str, ...]  # capabilities it needs: torch_cuda, ort_cuda, faiss_gpu


SECTIONS = {
    "fit": Plan("fit", 150, "{fit_steps} steps of ViT-B-32 (random weights, batch {fit_batch}) with amp_bf16 and amp "
                "(fp16) on {device}: steps/s, finite losses; each resumed from step {half}",
                ("torch", "safetensors.torch:load_file", "cmalign.train:fit", "cmalign.train.config:load_config",
                 "cmalign.train.run_dir:load_checkpoint_state"), ("torch_cuda",)),
    "onnx": Plan("onnx", 130, "export ViT-B-32 fp32+fp16; onnxruntime CUDA sessions (fallback and node placement "
                 "checked), parity vs torch CUDA eager (fp32 >= 0.99999, fp16 >= 0.999) and throughput at batch "
                 "{batches}",
                 ("torch", "onnx", "onnxruntime", "cmalign.model.loading:load_model",
                  "cmalign.model.loading:save_local_dir", "cmalign.export.onnx_export:export_model",
                  "cmalign.export.onnx_export:ExportConfig", "cmalign.export:load_export",
                  "cmalign.export.graphs:ImageEncoder", "cmalign.export.graphs:TextEncoder",
                  "cmalign.export.manifest:graph_file", "cmalign.export.runtime:make_session",
                  "cmalign.export.runtime:session_providers", "cmalign.data.synth:synth_split"),
                 ("torch_cuda", "ort_cuda")),
    "embed": Plan("embed", 50, "`cmalign embed --provider cuda` on generated:val:{embed_images} in a torch-free "
                  "process; vectors vs the CPU provider",
                  ("onnxruntime", "pandas", "cmalign.corpus.embed:EmbedConfig", "cmalign.corpus.store:shard_paths",
                   "cmalign.data.synth:image_for_key", "cmalign.export:load_export"), ("torch_cuda", "ort_cuda")),
    "faiss": Plan("faiss", 80, "faiss GPU vs CPU: Flat and IVF-Flat on {faiss_n:,} clustered 512-d vectors, built "
                  "and tuned as `cmalign index` does; recall@10 and QPS on {faiss_queries:,} held-out queries",
                  ("faiss", "numpy", "cmalign.index.build:make_index", "cmalign.index.build:fill_and_tune",
                   "cmalign.index.faiss_backend:to_gpu", "cmalign.index.faiss_backend:check_gpu",
                   "cmalign.index.tuning:RecallProbe", "cmalign.index.tuning:exact_knn",
                   "cmalign.index.tuning:tie_tolerant_recall", "cmalign.index.vectors:ArrayVectors",
                   "cmalign.index.choice:nlist_for", "cmalign.index.choice:ivf_train_size",
                   "index_benchmark:clustered"),
                  ("torch_cuda", "faiss_gpu")),
    "serve": Plan("serve", 60, "`cmalign index --gpu`, `cmalign search --provider cuda --gpu`, `cmalign serve "
                  "--provider cuda --gpu` under {serve_requests} text + image requests",
                  ("faiss", "onnxruntime", "fastapi", "uvicorn", "cmalign.serve.run:serve",
                   "cmalign.data.synth:image_for_key"), ("torch_cuda", "ort_cuda", "faiss_gpu")),
}
# The CLI options the sections pass: a dry run checks they exist, so a renamed flag fails in CI, not on the GPU.
CLI_OPTIONS = {"embed": ("--data", "--out", "--provider", "--batch-size", "--workers", "--quiet"),
               "index": ("--out", "--gpu"),
               "search": ("--text", "-k", "--provider", "--gpu", "--json"),
               "serve": ("--provider", "--gpu", "--port", "--quiet")}
CLI_USED_BY = {"embed": "embed", "index": "serve", "search": "serve", "serve": "serve"}


class CheckFailed(Exception):
    """A check a section cannot go on without."""


class SectionTimeout(Exception):
    pass


# ------------------------------------------------------------------------------------------------ arguments


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU work: import what the sections need, check the arguments, print the plan")
    ap.add_argument("--sections", default="all", help=f"comma-separated subset of {','.join(SECTIONS)} (or all)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="report path without suffix; .json and .md are written")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one, removed after)")
    ap.add_argument("--keep-work", action="store_true", help="keep the working directory")
    ap.add_argument("--device", default="cuda", help="torch device: cuda or cuda:N")
    ap.add_argument("--fit-steps", type=int, default=50)
    ap.add_argument("--fit-batch", type=int, default=128)
    ap.add_argument("--batches", default="1,32,256", help="onnx parity/throughput batch sizes")
    ap.add_argument("--embed-images", type=int, default=1000, help="generated val images to embed (5 captions each)")
    ap.add_argument("--faiss-n", type=int, default=200_000, help="vectors in the faiss comparison")
    ap.add_argument("--faiss-queries", type=int, default=2000)
    ap.add_argument("--serve-requests", type=int, default=200, help="text requests (and a quarter as many images)")
    ap.add_argument("--max-seconds", type=float, default=TIME_LIMIT_S,
                    help="a section not started by then fails as not started (default: the issue's 8 minutes)")
    args = ap.parse_args(argv)
    errors = []
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    if names == ["all"]:
        names = list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        errors.append(f"--sections: unknown section(s) {', '.join(unknown) or '(none given)'}; "
                      f"choose from {', '.join(SECTIONS)} or all")
    args.section_list = [n for n in SECTIONS if n in names]  # always in pipeline order
    try:
        args.batch_list = [int(b) for b in args.batches.split(",")]
        if not args.batch_list or min(args.batch_list) < 1:
            raise ValueError
    except ValueError:
        errors.append(f"--batches: expected positive integers separated by commas, got {args.batches!r}")
        args.batch_list = []
    if not (args.device == "cuda" or (args.device.startswith("cuda:") and args.device[5:].isdigit())):
        errors.append(f"--device: expected cuda or cuda:N, got {args.device!r}")
    for flag, value, lo in (("--fit-steps", args.fit_steps, 2), ("--fit-batch", args.fit_batch, 2),
                            ("--embed-images", args.embed_images, 16), ("--faiss-n", args.faiss_n, 20_000),
                            ("--faiss-queries", args.faiss_queries, 100), ("--serve-requests", args.serve_requests, 8)):
        if value < lo:
            errors.append(f"{flag}: must be >= {lo}, got {value}")
    if not args.max_seconds > 0:
        errors.append(f"--max-seconds: must be > 0, got {args.max_seconds}")
    if errors:
        ap.error("; ".join(errors))
    args.half = args.fit_steps // 2
    out = Path(args.out)
    args.out_stem = out.with_suffix("") if out.suffix in (".json", ".md") else out
    return args


def fit_overrides(args, precision: str, out: Path | str) -> dict:
    """The `fit` config of the fit section (flags as `cmalign fit --set` keys)."""
    return {"model.name": MODEL, "model.pretrained": "random", "train.device": args.device,
            "train.precision": precision, "train.steps": args.fit_steps, "train.batch_size": args.fit_batch,
            "train.checkpoint_every": args.half, "train.keep_checkpoints": 2, "train.guard_every": 0,
            "train.out": str(out), "data.synth_train_images": args.fit_steps * args.fit_batch,
            "data.val_max_images": 64}


def describe(args, plan: Plan) -> str:
    return plan.what.format(**{**vars(args), "batches": "/".join(map(str, args.batch_list))})


# ------------------------------------------------------------------------------------------------ dry run


def _import(spec: str):
    module, _, name = spec.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, name) if name else mod


def capabilities() -> dict[str, str | None]:
    """Each GPU capability the sections need: None when present, else why not (no GPU work is done)."""
    why: dict[str, str | None] = {}
    try:
        import torch

        why["torch_cuda"] = None if torch.cuda.is_available() else "no CUDA device: torch.cuda.is_available() is False"
    except ImportError as e:
        why["torch_cuda"] = f"torch is not importable ({e})"
    try:
        import onnxruntime as ort

        avail = ort.get_available_providers()
        why["ort_cuda"] = None if CUDA_EP in avail else (
            f"onnxruntime {ort.__version__} has no {CUDA_EP} (providers: {', '.join(avail)}; the gpu extra installs "
            "onnxruntime-gpu, without onnxruntime)")
    except ImportError as e:
        why["ort_cuda"] = f"onnxruntime is not importable ({e})"
    try:
        import faiss

        n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        build = "with" if hasattr(faiss, "StandardGpuResources") else "without"
        why["faiss_gpu"] = None if n > 0 else f"faiss {faiss.__version__} is built {build} GPU support and sees 0 GPUs"
    except ImportError as e:
        why["faiss_gpu"] = f"faiss is not importable ({e})"
    return why


def check_plan(args) -> tuple[list[str], dict[str, list[str]]]:
    """(errors in the script's own plan, {section: what this machine lacks for it}).

    A third-party package that is not installed is the machine's lack; a cmalign name that does not import, a fit
    config key or a CLI option that does not exist is the plan's error (the library moved under the script)."""
    plan_errors: list[str] = []
    lacks: dict[str, list[str]] = {s: [] for s in args.section_list}
    for s in args.section_list:
        for spec in SECTIONS[s].needs:
            try:
                _import(spec)
            except ModuleNotFoundError as e:
                top = (e.name or "").split(".")[0]
                if top in OWN_MODULES:
                    plan_errors.append(f"{s}: {spec}: {e}")
                else:
                    lacks[s].append(f"{top} is not installed")
            except (ImportError, AttributeError) as e:
                if spec.startswith(OWN_MODULES):
                    plan_errors.append(f"{s}: cannot import {spec}: {e}")
                else:
                    lacks[s].append(f"{spec}: {e}")
    if "fit" in args.section_list:
        try:
            from cmalign.train.config import FitConfig, apply_overrides

            for precision in PRECISIONS.values():
                apply_overrides(FitConfig(), fit_overrides(args, precision, "runs/x")).resolve_defaults().validate()
        except Exception as e:  # noqa: BLE001 - any refusal of the config is the plan's error
            plan_errors.append(f"fit: the fit config is refused: {e}")
    wanted = {cmd: opts for cmd, opts in CLI_OPTIONS.items() if CLI_USED_BY[cmd] in args.section_list}
    if wanted:
        try:
            import typer

            from cmalign.cli.main import app

            group = typer.main.get_command(app)
            for cmd, opts in wanted.items():
                command = group.commands.get(cmd)
                if command is None:
                    plan_errors.append(f"{CLI_USED_BY[cmd]}: `cmalign {cmd}` does not exist")
                    continue
                have = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
                missing = [o for o in opts if o not in have]
                if missing:
                    plan_errors.append(f"{CLI_USED_BY[cmd]}: `cmalign {cmd}` has no {', '.join(missing)}")
        except ModuleNotFoundError as e:
            for cmd in wanted:
                lacks.setdefault(CLI_USED_BY[cmd], []).append(f"the cmalign CLI does not import ({e})")
    why = capabilities()
    for s in args.section_list:
        for cap in SECTIONS[s].gpu_needs:
            if why.get(cap):
                lacks[s].append(why[cap])
    return plan_errors, {s: v for s, v in lacks.items() if v}


def dry_run(args) -> int:
    print("gpu_check plan (dry run: no GPU work, nothing written)")
    print(f"  report: {args.out_stem}.json and .md; work dir: {args.work or 'a temporary directory'}")
    total = 0
    for s in args.section_list:
        plan = SECTIONS[s]
        total += plan.budget_s
        print(f"  {s:6s} {plan.budget_s:4d} s  {describe(args, plan)}")
    print(f"  total  {total:4d} s of budgets (estimates); sections start only within --max-seconds "
          f"{args.max_seconds:.0f}, and one stops at twice its budget")
    plan_errors, lacks = check_plan(args)
    versions = _versions_light()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if lacks:
        print("would fail on this machine:")
        for s, why in lacks.items():
            print(f"  {s}: {'; '.join(dict.fromkeys(why))}")
    else:
        print("this machine has what every selected section needs")
    if total > args.max_seconds:
        plan_errors.append(f"the selected sections' budgets add up to {total} s, over --max-seconds "
                           f"{args.max_seconds:.0f}")
    if plan_errors:
        print("plan INVALID:", file=sys.stderr)
        for e in plan_errors:
            print(f"  {e}", file=sys.stderr)
        return 2
    print("dry run OK: the arguments and the plan are valid" +
          (" (a real run needs what is listed above)" if lacks else ""))
    return 0


def _versions_light() -> dict:
    out = {"python": platform.python_version()}
    for name in ("cmalign", "torch", "open_clip", "onnx", "onnxruntime", "faiss", "numpy"):
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
            out[name] = "not installed"
    return out


# ------------------------------------------------------------------------------------------------ machine


def machine_info(device: str) -> dict:
    import torch

    info: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "platform": platform.platform(),
                  "cpu_count": os.cpu_count(), **{f"{k}_version": v for k, v in _versions_light().items()}}
    info["torch_cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    info.update(gpu_count=torch.cuda.device_count(), gpu=props.name,
                gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_capability=f"{props.major}.{props.minor}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        rows = [r.split(", ") for r in smi.stdout.strip().splitlines()]
        if rows and len(rows[0]) >= 2:
            info["driver"] = rows[0][1]
        head = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
        if "CUDA Version:" in head:
            info["driver_cuda"] = head.split("CUDA Version:")[1].split()[0]
    except (OSError, subprocess.SubprocessError):
        info["driver"] = "unknown (no nvidia-smi)"
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
        info["onnxruntime_device"] = ort.get_device()
    except ImportError:
        pass
    try:
        import faiss

        info["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        pass
    return info


# ------------------------------------------------------------------------------------------------ running


@dataclass
class Section:
    name: str
    budget_s: int
    status: str = "not run"
    seconds: float = 0.0
    checks: list = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        return bool(ok)

    def require(self, name: str, ok: bool, detail: str = "") -> None:
        if not self.check(name, ok, detail):
            raise CheckFailed(f"{name}: {detail}")

    def to_dict(self) -> dict:
        return {"status": self.status, "seconds": round(self.seconds, 1), "budget_s": self.budget_s,
                "over_budget": self.seconds > self.budget_s, "checks": self.checks, "figures": self.figures,
                "notes": self.notes, "error": self.error, "traceback": self.traceback}


def _on_alarm(signum, frame):
    raise SectionTimeout("the section's hard time limit (2x its budget) ran out")


def extend_alarm(seconds: float) -> None:
    """Give the running section more time (a prerequisite it builds for itself brings its own budget)."""
    left = signal.getitimer(signal.ITIMER_REAL)[0]
    if left > 0:
        signal.setitimer(signal.ITIMER_REAL, left + seconds)


def alarm_left() -> float:
    left = signal.getitimer(signal.ITIMER_REAL)[0]
    return left if left > 0 else 600.0


class Context:
    """The working directory and the artifacts several sections share, built once on first use."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.device = args.device
        self._built: dict[str, object] = {}
        self._failed: dict[str, str] = {}
        self.b32 = None  # the LoadedModel the export was made from (torch reference of the onnx section)
        self.export_info: dict = {}
        self.embed_info: dict = {}

    def _once(self, key: str, build, budget: int):
        if key in self._failed:
            raise CheckFailed(f"prerequisite {key} failed earlier: {self._failed[key]}")
        if key not in self._built:
            extend_alarm(budget)
            try:
                self._built[key] = build()
            except BaseException as e:
                self._failed[key] = f"{type(e).__name__}: {e}"
                raise
        return self._built[key]

    def export(self) -> Path:
        return self._once("export", self._build_export, 90)

    def embeddings(self) -> Path:
        return self._once("embeddings", lambda: run_embed(self), SECTIONS["embed"].budget_s)

    def _build_export(self) -> Path:
        import torch

        from cmalign.export.onnx_export import ExportConfig, export_model
        from cmalign.model.loading import load_model, save_local_dir

        t0 = time.time()
        torch.manual_seed(0)
        self.b32 = load_model(MODEL)  # random weights: open_clip's init
        model_dir = save_local_dir(self.b32.model, self.b32.model_cfg, self.b32.preprocess_cfg, self.work / "b32-model")
        res = export_model(ExportConfig(source=str(model_dir), out=str(self.work / "export"), fp16=True,
                                        retrieval_images=0, overwrite=True))
        graphs = res.manifest["graphs"]
        self.export_info = {"export_s": round(time.time() - t0, 1), "exporter": res.manifest["exporter"],
                            "opset": res.manifest["opset"],
                            "cpu_parity_min_cos": {f"{v}_{t}": graphs[v][t]["parity"]["min_cosine"]
                                                   for v in graphs for t in graphs[v]}}
        return res.out


def run_section(name: str, fn, ctx: Context, started: float, args) -> Section:
    plan = SECTIONS[name]
    s = Section(name, plan.budget_s)
    elapsed = time.time() - started
    if elapsed >= args.max_seconds:
        s.status, s.error = "fail", (f"not started: the run had used {elapsed:.0f} s of its --max-seconds "
                                     f"{args.max_seconds:.0f} before this section")
        return s
    print(f"[gpu_check] {name}: {describe(args, plan)} (budget {plan.budget_s} s)", flush=True)
    t0 = time.time()
    signal.setitimer(signal.ITIMER_REAL, 2 * plan.budget_s)
    try:
        fn(ctx, s)
        failed = [c["check"] for c in s.checks if not c["ok"]]
        s.status = "fail" if failed else "pass"
        if failed:
            s.error = "failed checks: " + "; ".join(failed)
    except BaseException as e:  # noqa: BLE001 - a section's failure is recorded, the others still run
        if isinstance(e, KeyboardInterrupt):
            raise
        s.status = "fail"
        s.error = f"{type(e).__name__}: {e}"
        if not isinstance(e, (CheckFailed, SectionTimeout)):
            s.traceback = traceback.format_exc()[-6000:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        s.seconds = time.time() - t0
        _free_gpu()
    if s.seconds > s.budget_s:
        s.notes.append(f"over its budget: {s.seconds:.0f} s of {s.budget_s} s")
    print(f"[gpu_check] {name}: {s.status.upper()} in {s.seconds:.0f} s" + (f" — {s.error}" if s.error else ""),
          flush=True)
    return s


@contextlib.contextmanager
def part(s: Section, name: str):
    """One part of a section: its failure is recorded as a failed check and the section goes on to the next part."""
    try:
        yield
    except SectionTimeout:
        raise
    except CheckFailed:
        pass  # its check is recorded already
    except Exception as e:  # noqa: BLE001 - recorded, with the end of its traceback
        s.check(name, False, f"{type(e).__name__}: {e}")
        s.notes.append(f"{name}: " + traceback.format_exc()[-2500:])


def _free_gpu() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ------------------------------------------------------------------------------------------------ fit


def sec_fit(ctx: Context, s: Section) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    for key, precision in PRECISIONS.items():
        with part(s, f"{key}: fit runs"):
            out, overrides, rows = _fit_one(ctx, s, key, precision, console)
            with part(s, f"{key} resume: fit --resume runs"):
                s.figures[key]["resume"] = _check_resume(ctx, s, key, out, overrides, rows)
        _free_gpu()


def _fit_one(ctx: Context, s: Section, key: str, precision: str, console) -> tuple[Path, dict, list]:
    """One straight fit at ``precision``: (run directory, its config overrides, its train rows)."""
    import torch

    from cmalign.train import fit
    from cmalign.train.config import load_config

    args = ctx.args
    out = ctx.work / f"fit-{key}"
    overrides = fit_overrides(args, precision, out)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    fit(load_config(None, overrides), console=console, show_progress=False)
    wall = time.time() - t0
    manifest = json.loads((out / "manifest.json").read_text())
    rows = _train_rows(out / "metrics.jsonl")
    n = args.fit_steps
    s.require(f"{key}: ran on CUDA", str(manifest.get("device", "")).startswith(ctx.device.split(":")[0]),
              f"the run's manifest says device {manifest.get('device')!r}")
    s.check(f"{key}: precision {precision}", manifest.get("precision") == precision,
            f"the run's manifest says {manifest.get('precision')!r}")
    s.check(f"{key}: {n} steps logged once each", [r["step"] for r in rows] == list(range(1, n + 1)),
            f"{len(rows)} train rows")
    losses = [r["total"] for r in rows]
    s.check(f"{key}: losses finite", bool(losses) and all(math.isfinite(x) for x in losses),
            f"first {losses[0]:.4f}, last {losses[-1]:.4f}" if losses else "no losses")
    skipped = sum(not math.isfinite(r.get("grad_norm", 0.0)) for r in rows)
    s.check(f"{key}: optimizer steps taken", skipped <= n // 2,
            f"{skipped} of {n} steps had non-finite gradients" + (" (GradScaler skips those)" if key == "fp16"
                                                                  else ""))
    step_s = [r["seconds"] for r in rows[min(5, len(rows) - 1):]]
    med = statistics.median(step_s) if step_s else float("nan")
    s.figures[key] = {"steps_per_s": round(1 / med, 2) if med > 0 else None,
                      "pairs_per_s": round(args.fit_batch / med, 1) if med > 0 else None,
                      "median_step_s": round(med, 4), "fit_wall_s": round(wall, 1),
                      "first_loss": round(losses[0], 4) if losses else None,
                      "last_loss": round(losses[-1], 4) if losses else None,
                      "nonfinite_grad_steps": skipped,
                      "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                      if torch.cuda.is_available() else None,
                      "device": manifest.get("device"), "precision": manifest.get("precision")}
    _free_gpu()
    return out, overrides, rows


def _train_rows(path: Path) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get("kind") == "train"]


def _check_resume(ctx: Context, s: Section, key: str, straight: Path, overrides: dict, straight_rows: list) -> dict:
    """Resume a copy of the straight run from its half-way checkpoint; it must retrace the straight run."""
    from rich.console import Console
    from safetensors.torch import load_file

    from cmalign.train import fit
    from cmalign.train.config import load_config
    from cmalign.train.run_dir import RunDir, load_checkpoint_state

    args = ctx.args
    half, n = args.half, args.fit_steps
    ckpt = straight / "checkpoints" / f"step_{half:08d}.pt"
    s.require(f"{key}: checkpoint at step {half}", ckpt.is_file(),
              f"found {sorted(p.name for p in (straight / 'checkpoints').glob('*'))}")
    resumed = ctx.work / f"fit-{key}-resumed"
    # the run as a crash after step `half` leaves it: no final model, no manifest, only that checkpoint
    shutil.copytree(straight, resumed, ignore=lambda d, names: [x for x in names if Path(d) == straight and
                                                                x in ("model", "manifest.json")])
    for p in (resumed / "checkpoints").glob("step_*.pt"):
        if p.name != ckpt.name:
            p.unlink()
    t0 = time.time()
    fit(load_config(None, {**overrides, "train.out": str(resumed)}), resume=True,
        console=Console(stderr=True), show_progress=False)
    resume_s = time.time() - t0
    rows = _train_rows(resumed / "metrics.jsonl")
    s.check(f"{key} resume: log holds steps 1..{n} once each", [r["step"] for r in rows] == list(range(1, n + 1)),
            f"steps {rows[0]['step'] if rows else None}..{rows[-1]['step'] if rows else None}, {len(rows)} rows")
    after = [r["total"] for r in rows if r["step"] > half]
    s.check(f"{key} resume: losses finite", bool(after) and all(math.isfinite(x) for x in after))
    a = next((r["total"] for r in rows if r["step"] == half + 1), float("nan"))
    b = next((r["total"] for r in straight_rows if r["step"] == half + 1), float("nan"))
    rel = abs(a - b) / max(abs(b), 1e-12)
    s.check(f"{key} resume: step {half + 1} loss equals the straight run's", rel <= RESUME_FIRST_STEP_REL,
            f"{a:.7f} vs {b:.7f} (relative {rel:.1e}, bound {RESUME_FIRST_STEP_REL:.0e})")
    dev = ctx.device
    w_ckpt = load_checkpoint_state(RunDir(straight))["model"]
    w_straight = load_file(straight / "model" / "open_clip_model.safetensors", device=dev)
    w_resumed = load_file(resumed / "model" / "open_clip_model.safetensors", device=dev)
    diff = upd = 0.0
    for name, w in w_straight.items():
        if name in w_resumed and name in w_ckpt and w.is_floating_point():
            diff += float((w_resumed[name].double() - w.double()).pow(2).sum())
            upd += float((w.double() - w_ckpt[name].to(dev).double()).pow(2).sum())
    share = math.sqrt(diff) / max(math.sqrt(upd), 1e-30)
    s.check(f"{key} resume: final weights retrace the straight run", share <= RESUME_WEIGHT_SHARE,
            f"|w_resumed - w_straight| is {share:.2%} of the resumed steps' update |w_straight - w_step{half}| "
            f"(bound {RESUME_WEIGHT_SHARE:.0%})")
    del w_ckpt, w_straight, w_resumed
    _free_gpu()
    return {"resume_wall_s": round(resume_s, 1), "first_step_rel_diff": rel, "weight_diff_share": round(share, 5)}


# ------------------------------------------------------------------------------------------------ onnx


def node_placement(path: Path, variant: str, x, work: Path) -> dict:
    """Where onnxruntime ran each node (its profile), in a CUDA session made as make_session makes it."""
    import onnxruntime as ort

    from cmalign.export.runtime import default_optimization, session_providers

    so = ort.SessionOptions()
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   }[default_optimization(variant, PROVIDER)]
    so.enable_profiling = True
    so.profile_file_prefix = str(work / f"profile-{path.stem}")
    session = ort.InferenceSession(str(path), so, providers=session_providers(PROVIDER))
    session.run(None, {session.get_inputs()[0].name: x})
    prof = Path(session.end_profiling())
    events = json.loads(prof.read_text())
    prof.unlink(missing_ok=True)
    nodes, time_us, on_cpu = Counter(), Counter(), []
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        a = e.get("args", {})
        provider, op = a.get("provider", "?"), a.get("op_name", "?")
        nodes[provider] += 1
        time_us[provider] += int(e.get("dur", 0))
        if provider == "CPUExecutionProvider" and provider != CUDA_EP:
            sizes = [math.prod(dims) for t in (*a.get("input_type_shape", []), *a.get("output_type_shape", []))
                     for dims in t.values() if isinstance(dims, list)]
            biggest = max(sizes, default=0)
            if op in HEAVY_OPS or (biggest >= LARGE_ELEMENTS and op not in METADATA_OPS):
                on_cpu.append(f"{op} {e['name'].removesuffix('_kernel_time')} ({biggest} elements)")
    total = sum(time_us.values()) or 1
    return {"session_providers": session.get_providers(), "nodes": dict(nodes),
            "cpu_time_share": round(time_us.get("CPUExecutionProvider", 0) / total, 4), "compute_on_cpu": on_cpu}


def _timed(fn, budget_s: float = 0.6, max_reps: int = 30) -> float:
    """Median seconds per call after 3 warm-up calls; repeats until ``budget_s`` has passed (at least 3)."""
    for _ in range(3):
        fn()
    times, t_end = [], time.perf_counter() + budget_s
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextlib.contextmanager
def _no_tf32():
    import torch

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _on(providers: list) -> str:
    return f"session providers {providers}" + (
        "" if providers[:1] == [CUDA_EP] else ": the CUDA provider fell back to the CPU")


def _min_cos(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def sec_onnx(ctx: Context, s: Section) -> None:
    import numpy as np
    import onnxruntime as ort
    import torch

    from cmalign.data.synth import synth_split
    from cmalign.export import load_export
    from cmalign.export.graphs import ImageEncoder, TextEncoder
    from cmalign.export.manifest import graph_file
    from cmalign.export.runtime import default_optimization, make_session

    avail = ort.get_available_providers()
    s.require(f"onnxruntime has {CUDA_EP}", CUDA_EP in avail,
              f"onnxruntime {ort.__version__} offers {avail}"
              + ("" if CUDA_EP in avail else ": install onnxruntime-gpu, without onnxruntime"))
    export = ctx.export()
    s.figures["export"] = ctx.export_info
    batches = ctx.args.batch_list
    n_in = max(max(batches), 32)
    # load_export is what embed/search/serve use: it must refuse a CPU fallback, and did not
    rt = load_export(export, provider=PROVIDER)
    s.require(f"load_export(provider={PROVIDER!r}) runs on CUDA", rt.providers[0] == CUDA_EP, _on(rt.providers))
    records = synth_split("val", n_images=n_in, captions_per_image=1).records
    x = {"image": rt.preprocess([r.image.load().convert("RGB") for r in records]),
         "text": rt.tokenize([r.caption for r in records])}
    sessions = {}
    s.figures["placement"] = {}
    for variant in ("fp32", "fp16"):
        for tower in ("image", "text"):
            path = export / graph_file(tower, variant)
            sess = make_session(path, PROVIDER, optimization=default_optimization(variant, PROVIDER))
            s.require(f"{variant} {tower}: session on CUDA", sess.get_providers()[0] == CUDA_EP,
                      _on(sess.get_providers()))
            sessions[variant, tower] = sess
            place = node_placement(path, variant, x[tower][:2], ctx.work)
            s.figures["placement"][f"{variant}_{tower}"] = place
            s.check(f"{variant} {tower}: compute nodes on CUDA", not place["compute_on_cpu"],
                    f"nodes by provider {place['nodes']}, CPU share of kernel time {place['cpu_time_share']:.1%}"
                    + (f"; on the CPU: {', '.join(place['compute_on_cpu'][:8])}" if place["compute_on_cpu"] else ""))

    dev = torch.device(ctx.device)
    model = ctx.b32.model.eval()
    enc = {"image": ImageEncoder(model).eval(), "text": TextEncoder(model).eval()}
    with torch.inference_mode():  # torch on the CPU, as the export's own parity reference, on a few inputs
        ref_cpu = {t: enc[t](torch.from_numpy(x[t][:4])).numpy() for t in ("image", "text")}
    model.to(dev)

    def torch_run(tower, a, autocast=False):
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.float16, enabled=autocast):
            return enc[tower](torch.from_numpy(a).to(dev)).float().cpu().numpy()

    # the reference: torch CUDA fp32 with TF32 off (checked against the CPU's on those few inputs)
    ref = {}
    with _no_tf32():
        for tower in ("image", "text"):
            ref[tower] = np.concatenate([torch_run(tower, x[tower][i:i + 64]) for i in range(0, n_in, 64)])
    s.figures["torch_cuda_vs_cpu_min_cos"] = {t: _min_cos(ref[t][:4], ref_cpu[t]) for t in ("image", "text")}

    parity: dict = {}
    for variant in ("fp32", "fp16"):
        for tower in ("image", "text"):
            sess = sessions[variant, tower]
            name = sess.get_inputs()[0].name
            row = {}
            for b in batches:
                m = min(n_in, max(b, 32))  # batch 1: the first 32 inputs one by one
                got = np.concatenate([sess.run(None, {name: x[tower][i:i + b]})[0] for i in range(0, m, b)])
                row[f"batch_{b}"] = _min_cos(got, ref[tower][:m])
                row[f"batch_{b}_max_abs"] = float(np.abs(got.astype(np.float64) - ref[tower][:m]).max())
            worst = min(row[f"batch_{b}"] for b in batches)
            parity[f"{variant}_{tower}"] = row
            s.check(f"{variant} {tower}: parity with torch CUDA fp32 (min cosine >= {PARITY_BOUNDS[variant]})",
                    worst >= PARITY_BOUNDS[variant],
                    f"min cosine {worst:.7f} over batch {'/'.join(map(str, batches))}")
    s.figures["parity"] = parity
    if any(parity[f"fp32_{t}"][f"batch_{b}"] < PARITY_BOUNDS["fp32"] for t in ("image", "text") for b in batches):
        try:
            s.figures["fp32_parity_without_tf32"] = _parity_without_tf32(export, x, ref, batches)
        except Exception as e:  # noqa: BLE001 - a diagnosis only
            s.figures["fp32_parity_without_tf32"] = f"could not measure: {type(e).__name__}: {e}"
        s.notes.append("fp32 parity failed with the library's session; fp32_parity_without_tf32 is the same graph "
                       "with the CUDA provider's use_tf32=0 (make_session cannot set provider options)")

    with part(s, "throughput runs"):
        throughput: dict = {}
        for tower in ("image", "text"):
            for b in batches:
                xb = x[tower][:b]
                runners = {"torch_fp32": lambda xb=xb, t=tower: torch_run(t, xb),
                           "torch_fp16_autocast": lambda xb=xb, t=tower: torch_run(t, xb, autocast=True)}
                for variant in ("fp32", "fp16"):
                    sess = sessions[variant, tower]
                    runners[f"ort_{variant}"] = (lambda xb=xb, sess=sess:
                                                 sess.run(None, {sess.get_inputs()[0].name: xb}))
                per_s = {k: b / _timed(fn) for k, fn in runners.items()}
                throughput[f"{tower}_batch{b}"] = {
                    **{f"{k}_items_per_s": round(v, 1) for k, v in per_s.items()},
                    "ort_fp32_vs_torch_fp32": round(per_s["ort_fp32"] / per_s["torch_fp32"], 3),
                    "ort_fp16_vs_torch_fp16": round(per_s["ort_fp16"] / per_s["torch_fp16_autocast"], 3)}
                print(f"[gpu_check]   {tower} batch {b}: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in per_s.items()),
                      flush=True)
    s.figures["throughput"] = throughput
    s.notes.append("throughput: host numpy arrays in and out for torch and onnxruntime alike (the copies count)")
    ctx.b32.model.to("cpu")


def _parity_without_tf32(export: Path, x: dict, ref: dict, batches: list) -> dict:
    import numpy as np
    import onnxruntime as ort

    from cmalign.export.manifest import graph_file

    out = {}
    for tower in ("image", "text"):
        sess = ort.InferenceSession(str(export / graph_file(tower, "fp32")),
                                    providers=[(CUDA_EP, {"use_tf32": "0"}), "CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        b = 32 if 32 in batches else batches[0]
        m = min(len(x[tower]), max(b, 32))
        got = np.concatenate([sess.run(None, {name: x[tower][i:i + b]})[0] for i in range(0, m, b)])
        out[f"fp32_{tower}_batch_{b}"] = _min_cos(got, ref[tower][:m])
    return out


# ------------------------------------------------------------------------------------------------ embed


def _cli(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=max(10.0, timeout))


def _tail(text: str, n: int = 1500) -> str:
    return text.strip()[-n:]


def run_embed(ctx: Context) -> Path:
    """`cmalign embed --provider cuda` in its own (torch-free) process; raises CheckFailed when it cannot."""
    export = ctx.export()
    out = ctx.work / "emb"
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["embed", str(export), "--data", f"generated:val:{ctx.args.embed_images}", "--out", str(out),
           "--provider", PROVIDER, "--batch-size", "256", "--workers", "8", "--quiet"]
    t0 = time.time()
    proc = _cli(cmd, alarm_left() - 5)
    wall = time.time() - t0
    if proc.returncode != 0:
        hint = _torch_free_cuda_hint(export) if "could not start" in proc.stderr or CUDA_EP in proc.stderr else ""
        raise CheckFailed(f"`cmalign {' '.join(cmd)}` exited {proc.returncode}: {_tail(proc.stderr)}{hint}")
    from cmalign.corpus.store import shard_paths

    shard = json.loads(shard_paths(out, 0)["manifest"].read_text())
    providers = shard.get("providers") or []
    ctx.embed_info = {"command": "cmalign " + " ".join(cmd), "wall_s": round(wall, 1),
                      "images": shard["rows"]["images"], "texts": shard["rows"]["texts"], "seconds": shard["seconds"],
                      "setup_seconds": shard["setup_seconds"], "providers": providers}
    steady = shard["seconds"] - shard["setup_seconds"]
    ctx.embed_info["embeddings_per_s"] = round((shard["rows"]["images"] + shard["rows"]["texts"]) / steady, 1) \
        if steady > 0 else None
    if providers[:1] != [CUDA_EP]:
        raise CheckFailed(f"embed shard: {_on(providers)}")
    return out


def _torch_free_cuda_hint(export: Path) -> str:
    """Whether a torch-free process starts the CUDA provider, with make_session's own preload_dlls() call and
    without it (CMALIGN_ORT_PRELOAD=0)."""
    from cmalign.export.manifest import graph_file

    code = ("import sys\n"
            "from cmalign.export.runtime import make_session\n"
            "make_session(sys.argv[1], 'cuda')\n")
    path = str(export / graph_file("text", "fp32"))
    ok = {}
    for mode, preload in (("without preload", "0"), ("with preload", "1")):
        try:
            ok[mode] = subprocess.run([sys.executable, "-c", code, path], capture_output=True, timeout=120,
                                      env={**os.environ, "CMALIGN_ORT_PRELOAD": preload}).returncode == 0
        except subprocess.SubprocessError:
            ok[mode] = False
    return " — torch-free session probe: " + ", ".join(f"{m} {'ok' if v else 'fails'}" for m, v in ok.items())


def sec_embed(ctx: Context, s: Section) -> None:
    import numpy as np
    import pandas as pd

    from cmalign.corpus.store import shard_paths
    from cmalign.data.synth import image_for_key
    from cmalign.export import load_export

    out = ctx.embeddings()
    s.figures.update(ctx.embed_info)
    s.check("embed shard ran on CUDA", ctx.embed_info["providers"][:1] == [CUDA_EP], _on(ctx.embed_info["providers"]))
    paths = shard_paths(out, 0)
    meta = pd.read_parquet(paths["metadata"])
    img_emb, txt_emb = np.load(paths["image"]), np.load(paths["text"])
    s.check("all images and texts embedded", len(img_emb) == ctx.args.embed_images and len(txt_emb) >= len(img_emb),
            f"{len(img_emb)} images, {len(txt_emb)} texts")
    cpu = load_export(ctx.export(), provider="cpu")
    images = meta[meta["modality"] == "image"].sort_values("row").head(64)
    texts = meta[meta["modality"] == "text"].sort_values("row").head(256)
    got_i = cpu.encode_images([image_for_key(k) for k in images["key"]])
    got_t = cpu.encode_texts(list(texts["caption"]))
    cos_i = _min_cos(img_emb[images["row"].to_numpy()], got_i)
    cos_t = _min_cos(txt_emb[texts["row"].to_numpy()], got_t)
    s.figures["vs_cpu_provider_min_cos"] = {"image": cos_i, "text": cos_t}
    s.check(f"CUDA vectors match the CPU provider's (min cosine >= {PARITY_BOUNDS['fp32']})",
            min(cos_i, cos_t) >= PARITY_BOUNDS["fp32"],
            f"images {cos_i:.7f} ({len(images)}), texts {cos_t:.7f} ({len(texts)})")


# ------------------------------------------------------------------------------------------------ faiss


def _is_gpu_index(index) -> bool:
    return type(index).__name__.startswith("Gpu")


def sec_faiss(ctx: Context, s: Section) -> None:
    import numpy as np

    from cmalign.index.build import fill_and_tune, make_index
    from cmalign.index.choice import ivf_train_size, nlist_for
    from cmalign.index.faiss_backend import check_gpu, import_faiss, to_gpu
    from cmalign.index.tuning import RecallProbe, exact_knn, get_search_params, tie_tolerant_recall
    from cmalign.index.vectors import ArrayVectors

    sys.path.insert(0, str(HERE))
    from index_benchmark import clustered  # the index benchmark's CLIP-like vectors

    faiss = import_faiss()
    s.figures["gpus"] = check_gpu(faiss)  # GpuUnavailableError, saying what to install, when it sees none
    n, nq, d, k = ctx.args.faiss_n, ctx.args.faiss_queries, 512, 10
    t0 = time.time()
    data = clustered(n + nq, d, np.random.default_rng(0))
    corpus, queries = data[:n], np.ascontiguousarray(data[n:])
    dist, _ = exact_knn(corpus, queries, k)
    kth = dist[:, k - 1]
    vectors = ArrayVectors(corpus)
    probe = RecallProbe.held_out(vectors.blocks, vectors.gather, n, k=k, n_queries=1000, seed=1)
    s.figures["data_s"] = round(time.time() - t0, 1)
    nlist = nlist_for(n)
    rng = np.random.default_rng(1)
    pool = np.setdiff1d(np.arange(n), probe.positions)  # as `cmalign index`: tuning queries stay out of training
    train = corpus[np.sort(rng.choice(pool, size=min(len(pool), ivf_train_size(n, nlist)), replace=False))]

    def qps(index) -> tuple[float, np.ndarray]:
        index.search(queries[:100], k)
        times, found = [], None
        for _ in range(3):
            t = time.perf_counter()
            _, found = index.search(queries, k)
            times.append(time.perf_counter() - t)
        return nq / statistics.median(times), found

    for label, factory in (("Flat", "Flat"), ("IVF-Flat", f"IVF{nlist},Flat")):
        with part(s, f"{label}: build and search"):
            row: dict = {"factory": factory}
            found = {}
            for where in ("cpu", "gpu"):
                t = time.time()
                index = make_index(faiss, factory, d)
                target = index
                if where == "gpu":
                    target = to_gpu(faiss, index)
                    s.require(f"{label}: on a faiss GPU index", target is not None and _is_gpu_index(target),
                              f"to_gpu gave {type(target).__name__}" if target is not None else
                              "to_gpu gave None: faiss has no GPU version of this index")
                if not target.is_trained:
                    target.train(train)
                # as `cmalign index` builds: add (on the GPU for a GPU build), then tune on the CPU copy
                built, order, tuning = fill_and_tune(target, vectors, probe, 0.95,
                                                     to_cpu=faiss.index_gpu_to_cpu if where == "gpu" else None)
                build_s = time.time() - t
                searcher = to_gpu(faiss, built) if where == "gpu" else built  # what JointIndex(gpu=True) searches
                speed, found[where] = qps(searcher)
                recall = tie_tolerant_recall(lambda ids, order=order: corpus[order[ids]], queries, found[where], kth, k)
                row[where] = {"build_s": round(build_s, 2), "qps": round(speed, 1), "recall_at_10": round(recall, 4),
                              "params": get_search_params(built), "tuning_recall": round(tuning.recall, 4)}
                del searcher, target, index
            row["gpu_vs_cpu_qps"] = round(row["gpu"]["qps"] / row["cpu"]["qps"], 2)
            row["gpu_vs_cpu_build"] = round(row["cpu"]["build_s"] / max(row["gpu"]["build_s"], 1e-9), 2)
            s.figures[label] = row
            rc, rg = row["cpu"]["recall_at_10"], row["gpu"]["recall_at_10"]
            if label == "Flat":
                s.check("Flat: GPU search is exact", rg >= 0.999, f"recall@10 GPU {rg:.4f}, CPU {rc:.4f}")
            else:
                s.check(f"{label}: GPU-built index keeps the CPU's recall", rg >= rc - 0.02 and rg >= 0.9,
                        f"recall@10 GPU {rg:.4f} ({row['gpu']['params']}), CPU {rc:.4f} ({row['cpu']['params']})")
            s.check(f"{label}: GPU search faster than the CPU", row["gpu_vs_cpu_qps"] > 1,
                    f"{row['gpu']['qps']:,.0f} vs {row['cpu']['qps']:,.0f} queries/s")
            print(f"[gpu_check]   {label}: QPS GPU {row['gpu']['qps']:,.0f} / CPU {row['cpu']['qps']:,.0f}, "
                  f"recall {rg:.4f} / {rc:.4f}", flush=True)


# ------------------------------------------------------------------------------------------------ serve


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 60) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"} if body else {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _load(port: int, body: bytes, requests: int, concurrency: int, k: int) -> dict:
    def one(_):
        t = time.perf_counter()
        status, data = _http(port, "POST", "/v1/search", body)
        ok = status == 200 and len(json.loads(data).get("hits", [])) == k
        return time.perf_counter() - t, ok

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        res = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in res)
    return {"requests": requests, "concurrency": concurrency, "qps": round(requests / wall, 1),
            "p50_ms": round(1000 * lat[len(lat) // 2], 2),
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
            "bad": sum(not r[1] for r in res)}


def sec_serve(ctx: Context, s: Section) -> None:
    from cmalign.data.synth import image_for_key

    emb = ctx.embeddings()
    idx = ctx.work / "idx"
    shutil.rmtree(idx, ignore_errors=True)
    t0 = time.time()
    proc = _cli(["index", str(emb), "--out", str(idx), *FAISS_GPU], alarm_left() - 5)
    s.require("`cmalign index --gpu` succeeds", proc.returncode == 0, _tail(proc.stderr))
    manifest = json.loads((idx / "manifest.json").read_text())
    s.check("the index was built on the GPU", manifest["build"].get("gpu") is True, f"build {manifest['build']}")
    s.figures["index"] = {"wall_s": round(time.time() - t0, 1), "factory": manifest["factory"],
                          "vectors": manifest["ntotal"], "build_s": manifest["build"]["seconds"]}

    proc = _cli(["search", str(idx), "--text", "a red circle at the top", "-k", "5", "--provider", PROVIDER,
                 *FAISS_GPU, "--json"], alarm_left() - 5)
    s.require("`cmalign search --provider cuda --gpu` succeeds", proc.returncode == 0, _tail(proc.stderr))

    port = _free_port()
    log = ctx.work / "serve.log"
    with open(log, "w") as logf:
        server = subprocess.Popen([*CLI, "serve", str(idx), "--provider", PROVIDER, *FAISS_GPU, "--port", str(port),
                                   "--quiet"], stdout=logf, stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        ready = False
        while time.time() - t0 < min(120, alarm_left() - 5) and server.poll() is None:
            try:
                ready = _http(port, "GET", "/readyz", timeout=2)[0] == 200
            except OSError:
                pass
            if ready:
                break
            time.sleep(0.25)
        s.require("`cmalign serve --provider cuda --gpu` starts", ready,
                  f"ready in {time.time() - t0:.1f} s" if ready else
                  f"exit status {server.poll()}; log: {_tail(log.read_text())}")
        s.figures["startup_s"] = round(time.time() - t0, 1)
        status, data = _http(port, "GET", "/v1/indexes")
        described = json.loads(data) if status == 200 else []
        providers = described[0].get("providers", []) if described else []
        s.require("the served export runs on CUDA", providers[:1] == [CUDA_EP], "/v1/indexes: " + _on(providers))
        k = 10
        buf = io.BytesIO()
        image_for_key("synth/0/val/000007").save(buf, format="PNG")
        bodies = {"text": json.dumps({"text": "a large red circle in the center", "k": k}).encode(),
                  "image": json.dumps({"image": base64.b64encode(buf.getvalue()).decode(), "k": k}).encode()}
        n = ctx.args.serve_requests
        for kind, requests in (("text", n), ("image", max(8, n // 4))):
            _load(port, bodies[kind], 8, 4, k)  # warm-up
            r = _load(port, bodies[kind], requests, 8, k)
            s.figures[f"{kind}_load"] = r
            s.check(f"{kind} queries: every answer 200 with {k} hits", r["bad"] == 0,
                    f"{r['bad']} of {r['requests']} bad; {r['qps']} q/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
    s.figures["serve_log_tail"] = _tail(log.read_text(), 600)


# ------------------------------------------------------------------------------------------------ report


RUNNERS = {"fit": sec_fit, "onnx": sec_onnx, "embed": sec_embed, "faiss": sec_faiss, "serve": sec_serve}


def write_report(report: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    Path(f"{stem}.md").write_text(markdown(report))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.7f}" if 0.99 < v < 1 else (f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}")
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


def markdown(report: dict) -> str:
    m = report["machine"]
    over = ", exceeded" if report["total_seconds"] > report["max_seconds"] else ""
    lines = [f"# GPU check: {'PASS' if report['ok'] else 'FAIL'}", "",
             f"`{report['command']}` on {m.get('date', '?')}, {report['total_seconds']:.0f} s in all "
             f"(limit {report['max_seconds']:.0f} s{over}).",
             "", "| machine | |", "|---|---|"]
    for key in ("gpu", "gpu_count", "gpu_memory_gib", "gpu_capability", "driver", "driver_cuda", "torch_cuda", "cudnn",
                "torch_version", "onnxruntime_version", "onnxruntime_providers", "faiss_version", "faiss_gpus",
                "open_clip_version", "cmalign_version", "python_version", "cpu_count", "platform"):
        if key in m:
            lines.append(f"| {key} | {_fmt(m[key])} |")
    lines += ["", "| section | result | seconds (budget) | failed checks or error |", "|---|---|---|---|"]
    for name, sec in report["sections"].items():
        why = (sec.get("error") or "").replace("|", "\\|").replace("\n", " ")[:300]
        lines.append(f"| {name} | {sec['status'].upper()} | {sec['seconds']:.0f} ({sec['budget_s']}) | {why} |")
    for name, sec in report["sections"].items():
        lines += ["", f"## {name}: {sec['status'].upper()}", ""]
        for c in sec["checks"]:
            lines.append(f"- {'✅' if c['ok'] else '❌'} {c['check']}" + (f" — {c['detail']}" if c["detail"] else ""))
        for note in sec["notes"]:
            lines.append(f"- note: {note}")
        figures = dict(sec["figures"])
        tp = figures.pop("throughput", None)
        if tp:
            cols = [c for c in next(iter(tp.values()))]
            lines += ["", "| tower, batch | " + " | ".join(c.replace("_items_per_s", " /s") for c in cols) + " |",
                      "|---" * (len(cols) + 1) + "|"]
            lines += [f"| {key} | " + " | ".join(_fmt(v[c]) for c in cols) + " |" for key, v in tp.items()]
        if figures:
            lines += ["", "```json", json.dumps(figures, indent=1, default=str)[:6000], "```"]
        if sec.get("error"):
            lines += ["", "```", sec["error"][:3000], "```"]
        if sec.get("traceback"):
            lines += ["", "<details><summary>traceback</summary>", "", "```", sec["traceback"], "```", "</details>"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    try:
        import torch
    except ImportError as e:
        print(f"gpu_check: no CUDA device: torch is not importable ({e}); nothing was run", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device: torch.cuda.is_available() is False; nothing was run. "
              "This check needs a CUDA machine (--dry-run checks the plan anywhere).", file=sys.stderr)
        return 1
    if args.device == "cuda":
        args.device = f"cuda:{torch.cuda.current_device()}"
    if torch.device(args.device).index >= torch.cuda.device_count():
        print(f"gpu_check: no CUDA device {args.device}: torch sees {torch.cuda.device_count()}", file=sys.stderr)
        return 1
    started = time.time()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGALRM, _on_alarm)
    ctx = Context(args, work)
    report = {"benchmark": "gpu_check", "command": " ".join(["benchmarks/gpu_check.py", *(argv or sys.argv[1:])]),
              "ok": False, "max_seconds": args.max_seconds, "total_seconds": 0.0,
              "settings": {k: v for k, v in vars(args).items() if k not in ("out_stem",)},
              "machine": machine_info(args.device), "sections": {}}
    try:
        for name in args.section_list:
            sec = run_section(name, RUNNERS[name], ctx, started, args)
            report["sections"][name] = sec.to_dict()
            report["total_seconds"] = round(time.time() - started, 1)
            report["ok"] = all(x["status"] == "pass" for x in report["sections"].values())
            write_report(report, args.out_stem)
    finally:
        if not args.keep_work and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [n for n, x in report["sections"].items() if x["status"] != "pass"]
    print(f"[gpu_check] {'PASS' if not failed else 'FAIL: ' + ', '.join(failed)} in {report['total_seconds']:.0f} s; "
          f"report {args.out_stem}.json and .md", flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
