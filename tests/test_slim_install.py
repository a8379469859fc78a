"""The production install: `pip install 'cmalign[cpu]'` in a second virtualenv, without torch, torchvision, open_clip,
scikit-learn or matplotlib, runs embed → index → search → serve on an export made by the full install; `fit` there
stops with one line naming the extra to install.

The virtualenv is built once per pyproject.toml (in .cache-test/, ~1–2 min with pip's cache warm) and reused."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.server import Server

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "open_clip", "sklearn", "matplotlib", "hdbscan", "scipy")


@pytest.fixture(scope="module")
def slim_venv():
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    venv = ROOT / ".cache-test" / f"slim-venv-{key}"
    python = venv / "bin" / "python"
    if not (venv / "installed").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
        r = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[cpu]"],
                           capture_output=True, text=True, timeout=1200,
                           env={**os.environ, "PYTHONWARNINGS": "ignore:Editable installation"})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        (venv / "installed").write_text("ok")
    return venv


def _run(venv: Path, *args, **kw):
    return subprocess.run([str(venv / "bin" / "cmalign"), *args], capture_output=True, text=True, timeout=600, **kw)


def test_the_slim_install_has_no_training_stack(slim_venv):
    probe = f"import importlib.util as u, json; print(json.dumps({{m: u.find_spec(m) is not None for m in {HEAVY!r}}}))"
    r = subprocess.run([str(slim_venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(r.stdout) == {m: False for m in HEAVY}


def test_embed_index_search_serve_on_the_slim_install(slim_venv, tiny_export, tmp_path):
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    r = _run(slim_venv, "embed", str(tiny_export.out), "--data", "generated:val", "--out", str(emb))
    assert r.returncode == 0, r.stderr
    r = _run(slim_venv, "index", str(emb), "--out", str(idx))
    assert r.returncode == 0, r.stderr
    r = _run(slim_venv, "search", str(idx), "--text", "a red circle", "-k", "3", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)[0]["hits"]) == 3
    s = Server(str(idx), "-q", cmalign=str(slim_venv / "bin" / "cmalign"))
    try:
        query = json.dumps({"text": "a red circle", "num_images": 4}).encode()
        status, body, _ = s.request("POST", "/knn-service", query)
        assert status == 200 and len(json.loads(body)) == 4
        assert s.request("GET", "/")[0] == 200
    finally:
        code, out = s.stop()
    assert code in (0, -signal.SIGTERM), out  # uvicorn re-raises the SIGTERM it handled gracefully


def test_training_commands_on_the_slim_install_name_the_extra(slim_venv, tmp_path):
    r = _run(slim_venv, "fit", "--steps", "1", "--out", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    assert "needs the Python package 'torch'" in r.stderr and "cmalign[train" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


def test_an_adapter_applies_and_serves_on_the_slim_install(slim_venv, tiny_export, tmp_path):
    """Trained with the full install, an adapter re-maps stored vectors and its derived export encodes queries
    without torch; `adapt` itself names the extra."""
    from cmalign.adapter import AdaptConfig, adapt
    from cmalign.corpus import EmbedConfig, embed_dataset

    stored = tmp_path / "stored"
    embed_dataset(EmbedConfig(export=str(tiny_export.out), data="generated:test:100", out=str(stored)))
    adapter = adapt(AdaptConfig(embeddings=str(stored), out=str(tmp_path / "a"), steps=10, batch_size=32),
                    show_progress=False).out
    r = _run(slim_venv, "adapt-apply", str(stored), "--adapter", str(adapter), "--out", str(tmp_path / "mapped"))
    assert r.returncode == 0, r.stderr
    r = _run(slim_venv, "index", str(tmp_path / "mapped"), "--out", str(tmp_path / "idx"))
    assert r.returncode == 0, r.stderr
    r = _run(slim_venv, "search", str(tmp_path / "idx"), "--text", "a red circle", "-k", "3", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)[0]["hits"]) == 3, r.stderr
    r = _run(slim_venv, "adapt", str(stored), "--out", str(tmp_path / "a2"))
    assert r.returncode == 2 and "cmalign[train" in r.stderr and "Traceback" not in r.stderr, r.stderr
