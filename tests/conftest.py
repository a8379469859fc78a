import os
from pathlib import Path

import pytest
from helpers.shared import all_cores, built_once

# Tests never write to the user's cache: one shared cache per test session (CI sets its own).
os.environ.setdefault("CMALIGN_CACHE", str(Path(__file__).resolve().parent.parent / ".cache-test"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers share the cores: one OpenMP thread each (for the commands they start too), so that two workers'
    # torch thread pools do not contend for the same two cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow (real-size backbones)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: needs --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# Small, fast settings for fits that test mechanics (not quality): random init, tiny data.
FAST_FIT = [
    "--pretrained", "random", "--batch-size", "16", "--workers", "0", "--guard-every", "0",
    "--set", "data.synth_train_images=64", "--set", "data.val_max_images=16", "--quiet",
]


@pytest.fixture(scope="session")
def base_model_dir():
    """The embedded pretrained base (built once per cache; CI builds it on first use)."""
    from cmalign.model.base import ensure_base_model

    with all_cores():
        return ensure_base_model()


@pytest.fixture(scope="session")
def alignment_runs(base_model_dir, tmp_path_factory):
    """α = 0 and α = 0.5 fits of the default recipe from the embedded base, 120 steps each: {α: FitResult}."""
    from cmalign.train.config import load_config
    from cmalign.train.loop import fit

    def build(root: Path) -> dict:
        out = {}
        for alpha in (0.0, 0.5):
            cfg = load_config(overrides={"alpha_target": alpha, "train.steps": 120, "train.guard_every": 0,
                                         "train.checkpoint_every": 0, "train.out": str(root / f"a{alpha}")})
            out[alpha] = fit(cfg, show_progress=False)
        return out

    return built_once(tmp_path_factory, "alignment-runs", build)


@pytest.fixture(scope="session")
def tiny_export(base_model_dir, tmp_path_factory):
    """The base model exported with every variant and the full retrieval check (one export per session)."""
    from cmalign.export.onnx_export import ExportConfig, export_model

    return built_once(tmp_path_factory, "tiny-export", lambda root: export_model(
        ExportConfig(source=str(base_model_dir), out=str(root / "tiny"), fp16=True, int8=True)))


@pytest.fixture(scope="session")
def aligned_index(request, tmp_path_factory):
    """The α = 0.5 run exported, the generated validation split (1000 images, 5000 captions) embedded with it and
    indexed: what `cmalign serve` serves in the README. {"export", "emb", "index"} paths."""
    from cmalign.corpus.embed import EmbedConfig, embed_dataset
    from cmalign.export.onnx_export import ExportConfig, export_model
    from cmalign.index import IndexConfig, build_index

    alignment_runs = request.getfixturevalue("alignment_runs")

    def build(root: Path) -> dict:
        export = export_model(ExportConfig(source=str(alignment_runs[0.5].run_dir), out=str(root / "export"),
                                           int8=True, retrieval_images=0))
        embed_dataset(EmbedConfig(export=str(export.out), data="generated:val", out=str(root / "emb")))
        build_index(IndexConfig(embeddings=str(root / "emb"), out=str(root / "val")))
        return {"export": export.out, "emb": root / "emb", "index": root / "val"}

    return built_once(tmp_path_factory, "served", build)
