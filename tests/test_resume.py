"""Kill -9 in the middle of a fit, --resume, and the final weights equal an uninterrupted run's."""

import json
import os
import subprocess
import sys

from conftest import FAST_FIT
from safetensors.torch import load_file

ARGS = FAST_FIT + ["--steps", "24", "--checkpoint-every", "8", "--alpha-target", "0.5", "--lr", "1e-3"]


def _fit(out, *extra, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "cmalign.cli.main", "fit", *ARGS, "--out", str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=600)


def test_kill9_then_resume_gives_identical_weights(tmp_path):
    straight = _fit(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed = _fit(tmp_path / "killed", env_extra={"CMALIGN_FAULT_KILL_AT_STEP": "13"})
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    ckpts = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").glob("step_*.pt"))
    assert ckpts == ["step_00000008.pt"], ckpts  # killed after step 13: steps 9–13 are lost
    assert not (tmp_path / "killed" / "model").exists()

    resumed = _fit(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a = load_file(tmp_path / "straight" / "model" / "open_clip_model.safetensors")
    b = load_file(tmp_path / "killed" / "model" / "open_clip_model.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k] == b[k]).all()]
    assert not different, f"weights differ after resume: {different[:5]}"

    rows = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == list(range(1, 25)), "the log must hold each step once, in order, after a resume"
    straight_rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["total"] for r in rows] == [r["total"] for r in straight_rows]


def test_resume_refuses_changed_config(tmp_path):
    first = _fit(tmp_path / "run", env_extra={"CMALIGN_FAULT_KILL_AT_STEP": "9"})
    assert first.returncode == -9
    changed = _fit(tmp_path / "run", "--resume", "--alpha-target", "0.1")
    assert changed.returncode == 2
    assert "config differs" in changed.stderr

    # a checkpoint from a 2-process run cannot be resumed by 1 process: data order and global batch differ
    import torch

    ckpt = next((tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    state = torch.load(ckpt, weights_only=False)
    state["world_size"] = 2
    torch.save(state, ckpt)
    other = _fit(tmp_path / "run", "--resume")
    assert other.returncode == 2
    assert "trained with 2 processes" in " ".join(other.stderr.split())


def test_refuses_to_overwrite_a_run(tmp_path):
    assert _fit(tmp_path / "run").returncode == 0
    again = _fit(tmp_path / "run")
    assert again.returncode == 2
    assert "already holds a run" in again.stderr
