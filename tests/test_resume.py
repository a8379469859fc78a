"""Resuming a fit: after a kill -9 the final weights equal an uninterrupted run's; a run directory written before the
package re-layout still resumes; the log of skipped samples survives a resume without duplicates."""

import json
import os
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import FAST_FIT
from safetensors.torch import load_file

from cmalign.train.run_dir import RunDir

PRE_MOVE = Path(__file__).parent / "fixtures" / "pre_move"

ARGS = FAST_FIT + ["--steps", "24", "--checkpoint-every", "8", "--alpha-target", "0.5", "--lr", "1e-3"]


def _fit(out, *extra, env_extra=None, args=ARGS):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "cmalign.cli.main", "fit", *args, "--out", str(out), *extra],
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


def test_run_directory_written_before_the_relayout_resumes(tmp_path):
    """The pre-move code's RUN/config.toml, and a checkpoint recording the hash the pre-move code computed for it:
    `fit --resume` takes the run's own config.toml, finds the same hash, and finishes the run."""
    old = json.loads((PRE_MOVE / "hashes.json").read_text())
    run = tmp_path / "run"
    # the run's checkpoint (step 2 of 4), written by a run of that config killed at step 3
    first = _fit(run, "--config", str(PRE_MOVE / "run_config.toml"), "--quiet", args=[],
                 env_extra={"CMALIGN_FAULT_KILL_AT_STEP": "3"})
    assert first.returncode == -9, first.stderr[-2000:]
    (run / "config.toml").write_text((PRE_MOVE / "run_config.toml").read_text())  # byte for byte the old file
    import torch

    (ckpt,) = (run / "checkpoints").glob("step_*.pt")
    # unpickling imports only torch/numpy/builtins: moving cmalign's modules cannot break a checkpoint
    refs = _pickled_globals(ckpt)
    assert any(r.startswith("torch.") for r in refs) and not [r for r in refs if r.startswith("cmalign")]
    state = torch.load(ckpt, weights_only=False)
    assert sorted(state) == old["run_checkpoint_keys"]  # what the pre-move trainer put in a checkpoint
    state["config_hash"] = old["run"]
    n = state["rng"]["numpy"]  # numpy's RNG state as the pre-move trainer pickled it: a tuple holding an ndarray
    state["rng"]["numpy"] = (n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"],
                             n["cached_gaussian"])
    torch.save(state, ckpt)

    resumed = _fit(run, "--resume", "--quiet", args=[])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config_hash"] == old["run"] and manifest["steps"] == 4  # what a sweep recognises a run by


class _RunsCode:
    """What a crafted checkpoint holds: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    import torch

    run = tmp_path / "run"
    first = _fit(run, "--quiet", args=FAST_FIT + ["--steps", "4", "--checkpoint-every", "2"],
                 env_extra={"CMALIGN_FAULT_KILL_AT_STEP": "3"})
    assert first.returncode == -9, first.stderr[-2000:]
    (ckpt,) = (run / "checkpoints").glob("step_*.pt")
    state = torch.load(ckpt, weights_only=True)  # what cmalign writes loads without executing anything
    marker = tmp_path / "pwned"
    state["payload"] = _RunsCode(marker)
    torch.save(state, ckpt)

    resumed = _fit(run, "--resume", "--quiet", args=[])
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    assert "refused: it holds objects other than tensors and plain values" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert not marker.exists(), "loading the checkpoint ran its code"


def _pickled_globals(path) -> set[str]:
    """Module.name of every class or function a torch.save file refers to (what unpickling must import)."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]))
        if isinstance(arg, str):
            strings.append(arg)
    return found


def test_resume_lists_each_bad_sample_once(tmp_path):
    run = RunDir(tmp_path)
    rows = [{"source": s, "field": "image", "reason": "x"} for s in ("a.csv:2", "a.csv:3", "a.csv:9", "a.csv:2")]
    # a kill -9 can tear the last line mid-write
    run.bad.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"source": "a.csv:1')
    seen = run.listed_bad(0)
    assert seen == {"a.csv:2", "a.csv:3", "a.csv:9"}
    assert run.add_bad(0, [{"source": "a.csv:3", "field": "image", "reason": "x"},
                           {"source": "a.csv:10", "field": "image", "reason": "x"}], seen) == 1
    listed = [json.loads(x)["source"] for x in run.bad.read_text().splitlines()]
    assert listed == ["a.csv:2", "a.csv:3", "a.csv:9", "a.csv:10"]
    assert run.bad_file(1).name == "bad_samples.rank1.jsonl"
    assert run.listed_bad(1) == set()
