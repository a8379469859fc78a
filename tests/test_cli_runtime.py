"""The slim production install: `cmalign embed`, `index` and `search` through the installed entry point with torch,
torchvision, open_clip and scikit-learn not importable, and a CLI whose start-up imports none of them.
(What `cmalign fit` says there is tested in test_cli.py.)

The block is a ``sitecustomize.py`` on PYTHONPATH that sets ``sys.modules[name] = None``, so every ``import torch``
in the child process fails as it would where torch is not installed.
"""

import csv
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BLOCKED = ("torch", "torchvision", "open_clip", "sklearn")
CMALIGN = Path(sys.executable).parent / "cmalign"  # the console script `pip install` wrote
N_IMAGES = 12


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory) -> dict:
    """Environment of a child process in which torch, torchvision, open_clip and sklearn cannot be imported."""
    site = tmp_path_factory.mktemp("no_torch")
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys
        for name in {BLOCKED!r}:
            sys.modules[name] = None  # `import name` now raises ImportError
    """))
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore", "COLUMNS": "160"}


@pytest.fixture(scope="module")
def csv_corpus(tmp_path_factory) -> Path:
    """A dozen generated pictures as PNG files, two captions each, in open_clip's CSV layout."""
    from cmalign.data.synth import make_scene

    root = tmp_path_factory.mktemp("runtime_corpus")
    rows = []
    for i in range(N_IMAGES):
        scene = make_scene(0, "val", i)
        scene.load().save(root / f"scene_{i:02d}.png")
        rows += [(f"scene_{i:02d}.png", f"{scene.colour} {scene.shape} number {i}", scene.shape),
                 (f"scene_{i:02d}.png", f"a picture of {scene.count} {scene.shape}, view {i}", scene.shape)]
    with open(root / "corpus.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filepath", "title", "label"), *rows])
    return root / "corpus.csv"


def cmalign(env: dict, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    assert CMALIGN.is_file(), f"{CMALIGN}: the cmalign entry point is not installed (pip install -e .)"
    return subprocess.run([str(CMALIGN), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_the_block_holds(no_torch_env, tmp_path):
    for name in BLOCKED:
        p = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True,
                           env=no_torch_env, cwd=tmp_path)
        assert p.returncode != 0 and "halted; None in sys.modules" in p.stderr, (name, p.stderr)


def test_cli_start_up_imports_neither_torch_nor_sklearn(tmp_path):
    code = ("import sys, cmalign.cli.main\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {{*{BLOCKED!r}, 'faiss', 'onnxruntime'}}))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_help_runs_without_torch(no_torch_env, tmp_path):
    p = cmalign(no_torch_env, "--help", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    commands = re.findall(r"^\W ([a-z][a-z-]*)\s{2,}", p.stdout, re.MULTILINE)  # the rows of the Commands panel
    assert {"embed", "index", "index-add", "search"} <= set(commands), p.stdout
    p = cmalign(no_torch_env, "search", "--help", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "--text" in p.stdout and "--modality" in p.stdout


def test_embed_index_search_run_without_torch(no_torch_env, tiny_export, csv_corpus, tmp_path):
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    p = cmalign(no_torch_env, "embed", str(tiny_export.out), "--data", str(csv_corpus), "--out", str(emb),
                cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    manifest = json.loads((emb / "manifest.json").read_text())
    assert manifest["rows"] == {"images": N_IMAGES, "texts": 2 * N_IMAGES}

    p = cmalign(no_torch_env, "index", str(emb), "--out", str(idx), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"{3 * N_IMAGES} vectors ({N_IMAGES} images, {2 * N_IMAGES} texts)" in p.stdout, p.stdout
    assert "factory Flat" in p.stdout

    caption = next(r[1] for r in csv.reader(csv_corpus.read_text().splitlines()) if r[1].endswith("number 3"))
    p = cmalign(no_torch_env, "search", str(idx), "--text", caption, "-k", "4", "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    [block] = json.loads(p.stdout)
    assert block["query"] == caption and [h["rank"] for h in block["hits"]] == [1, 2, 3, 4]
    top = block["hits"][0]
    assert top["modality"] == "text" and top["caption"] == caption and top["score"] > 0.999

    p = cmalign(no_torch_env, "search", str(idx), "--text", caption, "-k", "3", "--modality", "image",
                "--image", str(csv_corpus.parent / "scene_05.png"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "text query" in p.stdout and "image query" in p.stdout and "scene_05.png" in p.stdout
    assert "Traceback" not in p.stderr
