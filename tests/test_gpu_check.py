"""benchmarks/gpu_check.py where no GPU is: its dry run passes, a real run stops at once and says why, and a section
name it does not know is refused. The GPU sections themselves run on a CUDA machine only."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
SECTIONS = ("fit", "onnx", "embed", "faiss", "serve")


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_dry_run_passes_and_prints_the_plan(tmp_path):
    out = tmp_path / "report"
    r = _run("--dry-run", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    plan = r.stdout.split("versions:")[0]
    for name in SECTIONS:
        assert f"\n  {name} " in plan, (name, r.stdout)
    assert "dry run OK" in r.stdout
    if not torch.cuda.is_available():
        assert "would fail on this machine" in r.stdout
        assert "torch.cuda.is_available() is False" in r.stdout
    assert not list(tmp_path.iterdir()), "a dry run writes nothing"


def test_dry_run_of_a_subset_lists_only_it():
    r = _run("--dry-run", "--sections", "faiss,fit")
    assert r.returncode == 0, r.stdout + r.stderr
    plan = r.stdout.split("versions:")[0]
    assert "\n  fit " in plan and "\n  faiss " in plan
    assert not any(f"\n  {name} " in plan for name in ("onnx", "embed", "serve"))
    assert plan.index("\n  fit ") < plan.index("\n  faiss "), "sections run in pipeline order"


@pytest.mark.parametrize("sections", ["fit,bogus", "gpu"])
def test_unknown_section_is_an_error(sections):
    for extra in (["--dry-run"], []):
        r = _run("--sections", sections, *extra)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "unknown section" in r.stderr and "choose from fit, onnx, embed, faiss, serve" in r.stderr


def test_plan_over_the_time_limit_is_invalid():
    r = _run("--dry-run", "--max-seconds", "60")
    assert r.returncode == 2
    assert "over --max-seconds 60" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_real_run_without_cuda_fails_at_once_and_says_why(tmp_path):
    out = tmp_path / "report"
    r = _run("--sections", "faiss", "--out", str(out))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no CUDA device: torch.cuda.is_available() is False" in r.stderr
    assert "[gpu_check] faiss" not in r.stdout, "no section may start"
    assert not list(tmp_path.iterdir()), "nothing ran, so no report claims anything"


def test_report_renders_a_failed_section():
    """The markdown writer on a report as a failed run leaves it (no GPU needed to write one)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    sec = gpu_check.Section("onnx", 130, status="fail", seconds=12.0, error="CheckFailed: fp32 image: session on CUDA")
    sec.check("fp32 image: session on CUDA", False, "session providers ['CPUExecutionProvider']: the CUDA provider "
              "fell back to the CPU")
    sec.figures["throughput"] = {"image_batch1": {"torch_fp32_items_per_s": 100.0, "ort_fp32_items_per_s": 150.0}}
    report = {"command": "benchmarks/gpu_check.py", "ok": False, "max_seconds": 480, "total_seconds": 20.0,
              "machine": {"date": "2026-01-01", "gpu": "NVIDIA H200"}, "sections": {"onnx": sec.to_dict()}}
    md = gpu_check.markdown(report)
    assert md.startswith("# GPU check: FAIL")
    assert "| onnx | FAIL |" in md and "fell back to the CPU" in md and "| image_batch1 | 100 | 150 |" in md
    json.dumps(report)
