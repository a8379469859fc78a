"""The examples and the documentation: every example runs and prints what it should; every link, import path,
repository path and command option the README and docs/ name exists.

Examples run as a user runs them, in a subprocess, with small settings; they reuse the session's cached base
model (CMALIGN_CACHE, set in conftest.py) and its α = 0.5 run, so this file costs about a minute on top of the
suite.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
TESTED_EXAMPLES = {"fit_and_measure.py", "export_and_embed.py", "evaluate.py"}


# ---------------------------------------------------------------------------------------------------- examples

def run_example(name: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "COLUMNS": "120", "PYTHONWARNINGS": "ignore"}  # CMALIGN_CACHE: the session's base model
    r = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, f"{name} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_every_example_has_a_test():
    assert {p.name for p in EXAMPLES.glob("*.py")} == TESTED_EXAMPLES


def test_fit_and_measure(base_model_dir, tmp_path):
    out = run_example("fit_and_measure.py", "--steps", "40", "--out", str(tmp_path / "run"), cwd=tmp_path)
    figures = {m[1]: (float(m[2]), float(m[3]))
               for m in re.finditer(r"^\s*(\w+): (-?[\d.e-]+) -> (-?[\d.e-]+)$", out, re.M)}
    assert set(figures) == {"raw", "centroid", "mmd2", "r1_t2i", "zeroshot_top1"}, out
    assert all(math.isfinite(v) for pair in figures.values() for v in pair)
    before, after = figures["raw"]
    # the base has a CLIP-like gap (0.84); 40 steps at α = 0.5 shrink it
    assert before > 0.7 and after < before - 0.05, out
    # not the centroid gap: in 40 steps the curriculum is still ramping α, and the paired term moves the pairs first
    # (measured: raw 0.838 -> 0.600 while the centroid gap went 0.5265 -> 0.5303)
    assert 0 < figures["zeroshot_top1"][1] <= 1 and 0 < figures["r1_t2i"][1] <= 1
    model = re.search(r"^model: local-dir:(.+)$", out, re.M)[1]
    assert (Path(model) / "open_clip_config.json").is_file() and (Path(model) / "open_clip_model.safetensors").is_file()


def test_export_and_embed(alignment_runs, tmp_path):
    run = alignment_runs[0.5].run_dir
    out = run_example("export_and_embed.py", str(run), "--export", str(tmp_path / "export"), "--emb",
                      str(tmp_path / "emb"), "--retrieval-images", "300", cwd=tmp_path)
    parity = {m[1]: m[2] for m in re.finditer(r"^(fp32|int8) (\{.*\}) R@1 (.*)$", out, re.M)}
    assert set(parity) == {"fp32", "int8"}, out
    for variant, bound in (("fp32", 0.99999), ("int8", 0.98)):
        cosines = [float(c) for c in re.findall(r"'(?:image|text)': ([\d.]+)", parity[variant])]
        assert len(cosines) == 2 and min(cosines) >= bound, (variant, parity[variant])
    assert "1000 image and 5000 text embeddings" in out
    assert (tmp_path / "emb" / "img_emb" / "img_emb_0000.npy").is_file()
    hits = re.findall(r"^(-?\d\.\d{3})  (\w+)\s+(.+)$", out, re.M)
    assert len(hits) == 5, out
    scores = [float(s) for s, _, _ in hits]
    assert scores == sorted(scores, reverse=True) and -1 <= scores[-1] <= scores[0] <= 1
    # "three small red circles": the tiny model knows colours better than shapes, so the
    # hits are red things; the caption shown is the image's first, which names the colour in most templates
    assert sum("red" in caption.split() for _, _, caption in hits) >= 3, out


def test_evaluate(alignment_runs, tmp_path):
    run = alignment_runs[0.5].run_dir
    out = run_example("evaluate.py", str(run), "--out", str(tmp_path / "report"), "--max-images", "150",
                      "--fit-images", "100", "--decoder-epochs", "2", cwd=tmp_path)
    rows = {m[1]: float(m[2]) for m in re.finditer(r"^\s*([\w+]+): raw gap ([\d.]+)  R@1", out, re.M)}
    assert set(rows) == {"model", "baseline", "baseline+centring", "baseline+procrustes"}, out
    assert rows["model"] < 0.6 * rows["baseline"], rows  # α = 0.5 closed most of its starting model's gap
    assert rows["baseline+procrustes"] < rows["baseline"], rows
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "report" / "metrics.json").is_file()
    r1 = float(re.search(r"^R@1 i→t of the shifted pairs: ([\d.]+)$", out, re.M)[1])
    assert r1 > 0.9  # a uniform shift keeps each pair's nearest neighbour
    assert re.search(r"^joint clustering after centring: \{.*'kmeans_ari'", out, re.M), out


# --------------------------------------------------------------------------------------------------------- docs

def prose(text: str) -> str:
    """The text without fenced code blocks (links inside code are not links)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower-case, punctuation and symbols dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LMN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} (.+)$", prose(page.read_text()), re.M):
        s = slug(m[1])
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text())):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_links_every_docs_page_and_stays_short():
    readme = (ROOT / "README.md").read_text()
    assert [p.name for p in DOCS if f"(docs/{p.name})" not in readme] == []
    assert len(readme.splitlines()) <= 300, "the README is the newcomer's page: move reference into docs/"


def test_layout_sections_name_every_package():
    packages = sorted(p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "cmalign").glob("*/__init__.py"))
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    development = (ROOT / "docs" / "development.md").read_text()
    for top in ("cli", "export"):
        assert re.search(rf"^{top}/\s+\(cmalign\.{top}\)", layout, re.M), f"README's Layout does not show {top}/"
    for pkg in packages:
        name = pkg.split("/")[-1]
        assert re.search(rf"^{pkg}/?\s", layout, re.M), f"README's Layout does not show {pkg}"
        assert f"  {name}/" in development, f"docs/development.md's layout does not show {pkg}/"


def resolve(dotted: str):
    """Import the longest module prefix of ``dotted`` and getattr the rest; raise if anything is missing."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as e:
            if e.name and not ".".join(parts[:i]).startswith(e.name):
                raise  # the module exists but one of its own imports is missing
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def documented_names() -> set[str]:
    """Every `from cmalign… import a, b` and every dotted cmalign.… name in the README, docs and examples."""
    names = set()
    for page in [*PAGES, *EXAMPLES.glob("*.py")]:
        text = page.read_text()
        for module, imported in re.findall(r"from (cmalign(?:\.\w+)*) import ([\w, ]+)", text):
            names |= {f"{module}.{n.strip()}" for n in imported.split(",") if n.strip()}
        names |= set(re.findall(r"\bcmalign(?:\.[A-Za-z_]\w*)+", text))
    return names


@pytest.mark.parametrize("dotted", sorted(documented_names()))
def test_documented_python_names_exist(dotted):
    resolve(dotted)


def test_documented_repository_paths_exist():
    # a path from the repository root, not the tail of another path ("run/export/model" is prose)
    pattern = r"(?<![\w/.-])((?:benchmarks|examples|tests|scripts|cmalign|cli|export|docs)/[\w./-]*\w)"
    missing = set()
    for page in PAGES:
        for path in re.findall(pattern, page.read_text()):
            if not (ROOT / path).exists() and not (page.parent / path).exists():
                missing.add(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, sorted(missing)


COMMAND_PAGES = {"fit": "fit.md", "export": "export.md", "embed": "embed.md", "embed-merge": "embed.md",
                 "embed-import": "adapt.md", "index": "joint-index.md", "index-add": "joint-index.md",
                 "search": "joint-index.md", "serve": "serve.md", "adapt": "adapt.md", "adapt-apply": "adapt.md",
                 "eval": "eval.md", "sweep": "sweep.md", "data synth": "data.md"}


def cli_commands():
    """(command name, click-style command) for every command and sub-command of `cmalign`."""
    import typer.main

    from cmalign.cli.main import app

    def walk(group, prefix):  # typer vendors its own click: duck-type groups rather than isinstance
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                yield from walk(cmd, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", cmd

    return dict(walk(typer.main.get_command(app), ""))


def test_every_command_and_option_is_documented():
    commands = cli_commands()
    assert set(commands) == set(COMMAND_PAGES), "a new command needs a docs page (and a line in COMMAND_PAGES)"
    missing = []
    for name, cmd in commands.items():
        page = (ROOT / "docs" / COMMAND_PAGES[name]).read_text()
        assert f"cmalign {name}" in page, f"docs/{COMMAND_PAGES[name]} does not show `cmalign {name}`"
        for param in cmd.params:
            if param.param_type_name == "option" and param.opts[0] != "--help":
                opt = max(param.opts, key=len)
                if f"`{opt}" not in page and f" {opt} " not in page:
                    missing.append(f"cmalign {name} {opt} (docs/{COMMAND_PAGES[name]})")
    assert not missing, missing
