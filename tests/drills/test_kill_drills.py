"""Fault drills: `fit`, `export`, `embed` and `index`, fresh and with --overwrite, killed with SIGKILL at seeded random
points (see drills/killing.py: CMALIGN_DRILL_KILLS points per form, CMALIGN_DRILL_SEED).

After each kill: the old artifact is intact (every file as before) or the new one is complete (the library's loader
takes it), nothing half-written is visible under a final name, and whatever the killed run left is hidden and
named after its pid. Then the same command is run again: it must succeed, give what an uninterrupted run gives, and
remove those leftovers. A fit killed after its first checkpoint is a run: `fit --out` refuses it naming --resume,
and `fit --resume` finishes it with the weights of an uninterrupted fit; killed before, it is not a run yet and
`fit --out` starts it again.

The --overwrite drills alternate two settings (opset, batch size, index type), so the old and the new artifact
differ and a mix of the two would show.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_FIT

from drills.killing import (
    Outcome,
    check_fresh,
    check_no_leftovers,
    check_replaced_or_intact,
    file_hashes,
    hidden_entries,
    kill_delays,
    ok,
    run_cli,
)


@dataclass
class Ref:
    """An artifact from an uninterrupted run, and that run (how long it took, when it changed files)."""

    path: Path
    clean: Outcome


def _clean(args: list[str], out: Path, work: Path) -> Ref:
    """Run ``cmalign ARGS --out OUT`` uninterrupted, watching the directory OUT is in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Ref(out, ok([*args, "--out", str(out)], work / "logs", watch=out.parent))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("drills")


def _drill_fresh(form: str, args: list[str], ref: Ref, work: Path, load, same=None) -> list[str]:
    """Kill ``cmalign ARGS --out OUT`` (a new OUT each time); the rerun must succeed unless the killed run had
    finished its artifact. ``same(out, ref)`` compares the result with the uninterrupted run's."""
    states = []
    for k, delay in enumerate(kill_delays(form, ref.clean)):
        out = work / f"{form}-{k}" / "out"
        o = run_cli([*args, "--out", str(out)], work / "logs", kill_after=delay)
        state = check_fresh(out, o, load)
        if state == "absent":
            ok([*args, "--out", str(out)], work / "logs")
            load(out)
        else:  # complete: writing it again is an overwrite, which cleans up too
            ok([*args, "--out", str(out), "--overwrite"], work / "logs")
        check_no_leftovers(out, f"the rerun after {o.describe()}")
        if same:
            same(out, ref)
        states.append(state)
        print(f"  {o.describe()}: {state}; rerun ok")
    return states


def _drill_overwrite(form: str, args: list[str], variants: list[list[str]], ref: Ref, work: Path, load,
                     same=None) -> list[str]:
    """Kill ``cmalign ARGS VARIANT --out OUT --overwrite`` over the artifact the previous rerun left, the variant
    changing each time; the rerun must succeed. ``ref`` was made with the last variant."""
    out = work / form / "out"
    shutil.copytree(ref.path, out)
    clean = _clean([*args, *variants[-1], "--overwrite"], out, work).clean
    states = []
    for k, delay in enumerate(kill_delays(form, clean)):
        variant = variants[k % len(variants)]
        before = file_hashes(out)
        command = [*args, *variant, "--out", str(out), "--overwrite"]
        o = run_cli(command, work / "logs", kill_after=delay)
        state = check_replaced_or_intact(out, before, o, load)
        ok(command, work / "logs")
        load(out)
        check_no_leftovers(out, f"the rerun after {o.describe()}")
        if same:
            same(out, ref)
        states.append(state)
        print(f"  {o.describe()}: {state}; rerun ok")
    return states


# --------------------------------------------------------------------------- fit

STEPS = 6  # checkpoints after steps 2 and 4; the final model after 6
FIT_ARGS = ["fit", *FAST_FIT, "--steps", str(STEPS), "--checkpoint-every", "2", "--alpha-target", "0.5", "--lr", "1e-3"]
SET_UP_FILES = {"config.toml", "summary.json", "metrics.jsonl", "bad_samples.jsonl"}  # before the first checkpoint


def test_fit_killed_then_resumed_or_restarted(work):
    from safetensors.numpy import load_file
    from typer.testing import CliRunner

    from cmalign.artifacts.sources import resolve_source, run_finished
    from cmalign.cli.main import app
    from cmalign.train.run_dir import RunDir, load_checkpoint_state

    logs = work / "logs"
    ref = _clean(FIT_ARGS, work / "fit-ref" / "run", work)
    want = load_file(ref.path / "model" / "open_clip_model.safetensors")
    refusal_seen = hint_seen = False
    for k, delay in enumerate(kill_delays("fit", ref.clean)):
        out = work / f"fit-{k}" / "run"
        o = run_cli([*FIT_ARGS, "--out", str(out)], logs, kill_after=delay)
        assert o.killed or o.returncode == 0, f"{o.describe()}\n{o.log[-3000:]}"
        run = RunDir(out)
        if run_finished(out):
            state = "finished"
        elif run.has_run():
            state = "resumable"
            assert load_checkpoint_state(run) is not None, f"{o.describe()}: a run without a readable checkpoint"
            if not refusal_seen:  # the same command again must refuse, and say how to go on (in-process: cheaper)
                again = CliRunner().invoke(app, [*FIT_ARGS, "--out", str(out)])
                assert again.exit_code == 2 and "--resume" in again.output, again.output
                refusal_seen = True
            ok([*FIT_ARGS, "--out", str(out), "--resume"], logs)
        else:
            state = "not a run"
            visible = set(file_hashes(out))
            assert visible <= SET_UP_FILES, f"{o.describe()}: not a run, but left {sorted(visible - SET_UP_FILES)}"
            if not hint_seen and "config.toml" in visible:  # --resume must say to start it again
                again = CliRunner().invoke(app, [*FIT_ARGS, "--out", str(out), "--resume"])
                assert again.exit_code == 2 and "without --resume" in " ".join(again.output.split()), again.output
                hint_seen = True
            ok([*FIT_ARGS, "--out", str(out)], logs)
        print(f"  {o.describe()}: {state}; rerun ok")

        assert run_finished(out) and resolve_source(out).kind == "run"
        got = load_file(out / "model" / "open_clip_model.safetensors")
        assert got.keys() == want.keys() and all(np.array_equal(got[n], want[n]) for n in want), \
            f"after {o.describe()} and a rerun, the weights differ from an uninterrupted fit's"
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows if r["kind"] == "train"]
        assert steps == list(range(1, STEPS + 1)), f"after {o.describe()}: the log must hold each step once, in order"
        assert not hidden_entries(out), f"after {o.describe()} and a rerun: {hidden_entries(out)} remain"


# --------------------------------------------------------------------------- export

EXPORT_ARGS = ["--exporter", "legacy", "--retrieval-images", "0", "-q"]  # legacy: the faster exporter here
OPSETS = [["--opset", "19"], ["--opset", "20"]]


@pytest.fixture(scope="module")
def export_ref(base_model_dir, work) -> Ref:
    return _clean(["export", str(base_model_dir), *EXPORT_ARGS, *OPSETS[-1]], work / "export-ref" / "export", work)


def _load_export(out: Path):
    from cmalign.export import load_export

    return load_export(out)  # checks every graph against the manifest's checksums and fingerprint


def test_export_killed(base_model_dir, export_ref, work):
    args = ["export", str(base_model_dir), *EXPORT_ARGS]
    _drill_fresh("export", [*args, *OPSETS[-1]], export_ref, work, _load_export)
    _drill_overwrite("export-overwrite", args, OPSETS, export_ref, work, _load_export)


# --------------------------------------------------------------------------- embed

BATCHES = [["--batch-size", "8"], ["--batch-size", "64"]]


@pytest.fixture(scope="module")
def corpus_csv(work) -> Path:
    from cmalign.data.synth import write_synth

    write_synth(work / "data", sizes={"val": 96}, captions_per_image=2)
    return work / "data" / "val.csv"


@pytest.fixture(scope="module")
def embeddings_ref(export_ref, corpus_csv, work) -> Ref:
    return _clean(["embed", str(export_ref.path), "--data", str(corpus_csv), "-q", *BATCHES[-1]],
                  work / "embed-ref" / "emb", work)


def _load_embeddings(out: Path):
    from cmalign.corpus import load_embeddings

    return load_embeddings(out)


def _same_embeddings(out: Path, ref: Ref) -> None:
    got, want = _load_embeddings(out), _load_embeddings(ref.path)
    np.testing.assert_allclose(got.image, want.image, atol=1e-6)
    np.testing.assert_allclose(got.text, want.text, atol=1e-6)
    assert got.text_metadata["caption"].tolist() == want.text_metadata["caption"].tolist()


def test_embed_killed(export_ref, corpus_csv, embeddings_ref, work):
    args = ["embed", str(export_ref.path), "--data", str(corpus_csv), "-q"]
    _drill_fresh("embed", [*args, *BATCHES[-1]], embeddings_ref, work, _load_embeddings, _same_embeddings)
    _drill_overwrite("embed-overwrite", args, BATCHES, embeddings_ref, work, _load_embeddings, _same_embeddings)


# --------------------------------------------------------------------------- index

FACTORIES = [["--factory", "HNSW32"], ["--factory", "Flat"]]


@pytest.fixture(scope="module")
def index_ref(embeddings_ref, work) -> Ref:
    return _clean(["index", str(embeddings_ref.path), "-q", *FACTORIES[-1]], work / "index-ref" / "idx", work)


def _load_index(out: Path):
    from cmalign.index import load_index

    return load_index(out)  # checks the files' checksums against the manifest


def _same_index(out: Path, ref: Ref) -> None:
    got, want = _load_index(out), _load_index(ref.path)
    assert got.index.ntotal == want.index.ntotal and got.ids.equals(want.ids)


def test_index_killed(embeddings_ref, index_ref, work):
    args = ["index", str(embeddings_ref.path), "-q"]
    _drill_fresh("index", [*args, *FACTORIES[-1]], index_ref, work, _load_index, _same_index)
    _drill_overwrite("index-overwrite", args, FACTORIES, index_ref, work, _load_index, _same_index)
