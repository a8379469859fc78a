"""DDP: the CMA loss and the TPC-CMA step over 2 gloo processes equal one process on the same global batch."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HELPER = Path(__file__).parent / "helpers" / "ddp_step.py"


def _run(tmp_path, world, mode, distribution):
    out = tmp_path / f"w{world}-{mode}-{distribution}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if world == 1:
        cmd = [sys.executable, str(HELPER), str(out), mode, distribution]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        cmd = [torchrun, "--standalone", f"--nproc_per_node={world}", str(HELPER), str(out), mode, distribution]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("mode,distribution", [("project", "mmd"), ("off", "coral")])
def test_two_ranks_equal_one_process(tmp_path, mode, distribution):
    single = _run(tmp_path, 1, mode, distribution)
    ddp = _run(tmp_path, 2, mode, distribution)
    for key in ("clip", "centroid2", "distribution", "cma", "total"):
        assert ddp["row"][key] == pytest.approx(single["row"][key], rel=1e-5, abs=1e-7), key
    if mode != "off":
        assert ddp["decision"]["grad_cos"] == pytest.approx(single["decision"]["grad_cos"], abs=1e-5)
    assert single["grads"].keys() == ddp["grads"].keys()
    for name, g in single["grads"].items():
        torch.testing.assert_close(ddp["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
