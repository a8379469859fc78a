"""`--engine ray`: embedding and sweeps on a real local Ray instance (started here, 2 CPUs), checked against the
local engine's output file by file; a killed encoder actor; reruns; the errors raised before anything runs."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cmalign.cli.main import app
from cmalign.cluster.connect import ClusterError, RayOptions, check_every_node
from cmalign.corpus.embed import EmbedConfig, embed_dataset
from cmalign.corpus.store import load_embeddings, read_shard_manifests, shard_paths
from cmalign.data.synth import make_scene
from cmalign.errors import MissingDependencyError

runner = CliRunner()
ENCODER = b"ray::MapWorker(MapBatches(_Encoder))"
IDENTITY = ("export", "export_fingerprint", "model", "variant", "embed_dim", "dtype", "data", "num_shards")


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def csv_with_bad_images(tmp_path_factory):
    """36 PNG scenes with two captions each, plus a corrupt, a truncated and a missing image (open_clip's CSV)."""
    root = tmp_path_factory.mktemp("cluster_data")
    rows = []
    for i in range(36):
        scene = make_scene(0, "val", i)
        path = root / f"scene_{i:02d}.png"
        scene.load().save(path)
        rows += [(path.name, f"{scene.colour} {scene.shape} {i}", scene.shape), (path.name, f"view {i}", scene.shape)]
    (root / "corrupt.png").write_bytes(b"\x89PNG not really an image" * 20)
    whole = (root / "scene_05.png").read_bytes()
    (root / "truncated.png").write_bytes(whole[:len(whole) // 2])
    rows[10:10] = [("corrupt.png", "a corrupt one", "x"), ("corrupt.png", "its second caption", "x")]
    rows[30:30] = [("truncated.png", "half a file", "y"), ("missing.png", "a lost image", "z")]
    data = root / "data.csv"
    data.write_text("filepath,title,label\n" + "".join(f"{p},{c},{lab}\n" for p, c, lab in rows))
    return data


def _cfg(export, data, out, **kw):
    return EmbedConfig(export=str(export.out), data=str(data), out=str(out), batch_size=8, image_root=None, **kw)


def _same_directory(a: Path, b: Path, n: int) -> None:
    """Two embeddings directories hold the same shards: metadata and bad samples equal, vectors within fp32."""
    ma, mb = read_shard_manifests(a), read_shard_manifests(b)
    assert sorted(ma) == sorted(mb) == list(range(n))
    for i in range(n):
        assert {k: ma[i][k] for k in IDENTITY} == {k: mb[i][k] for k in IDENTITY}
        assert ma[i]["rows"] == mb[i]["rows"] and ma[i]["skipped"] == mb[i]["skipped"]
        pa, pb = shard_paths(a, i), shard_paths(b, i)
        pd.testing.assert_frame_equal(pd.read_parquet(pa["metadata"]), pd.read_parquet(pb["metadata"]))
        assert pa["bad"].read_text() == pb["bad"].read_text()
        for kind in ("image", "text"):
            va, vb = np.load(pa[kind]), np.load(pb[kind])
            assert va.shape == vb.shape and va.dtype == vb.dtype
            np.testing.assert_allclose(va, vb, atol=2e-6)
    assert {k: v for k, v in json.loads((a / "manifest.json").read_text()).items() if k != "shards"} == \
        {k: v for k, v in json.loads((b / "manifest.json").read_text()).items() if k != "shards"}


def test_ray_engine_writes_what_the_local_engine_writes(ray_instance, tiny_export, csv_with_bad_images, tmp_path):
    local = tmp_path / "local"
    for i in range(3):
        embed_dataset(_cfg(tiny_export, csv_with_bad_images, local, shard=f"{i}/3"))
    result = embed_dataset(_cfg(tiny_export, csv_with_bad_images, tmp_path / "ray", engine="ray", shards=3))
    assert result.merged and result.images == 36 and result.texts == 72
    _same_directory(local, tmp_path / "ray", 3)
    bad = [json.loads(x) for i in range(3) for x in shard_paths(tmp_path / "ray", i)["bad"].read_text().splitlines()]
    assert sorted({(b["field"], b["source"].rsplit(":", 1)[1]) for b in bad}) == sorted(
        {("image", "12"), ("caption", "12"), ("caption", "13"), ("image", "32"), ("caption", "32"), ("image", "33")})
    manifest = read_shard_manifests(tmp_path / "ray")[0]
    assert manifest["engine"]["name"] == "ray" and manifest["engine"]["actors"] == 2


def _encoder_pids() -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if Path(f"/proc/{p}/cmdline").read_bytes().startswith(ENCODER):
                    pids.append(int(p))
            except OSError:
                pass
    return pids


def test_a_killed_encoder_actor_costs_no_row(ray_instance, tiny_export, tmp_path):
    data, n = "generated:val:1600", 8
    embed_dataset(_cfg(tiny_export, data, tmp_path / "local", shard="0/1"))
    out = tmp_path / "ray"
    box = {}
    job = threading.Thread(target=lambda: box.update(result=embed_dataset(
        _cfg(tiny_export, data, out, engine="ray", shards=n))))
    job.start()
    deadline = time.time() + 120
    while not shard_paths(out, 0)["manifest"].is_file() and job.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    victims = _encoder_pids()
    assert victims, "no encoder actor process found while the pipeline ran"
    os.kill(victims[0], signal.SIGKILL)
    done_at_kill = len(read_shard_manifests(out))
    job.join(300)
    assert not job.is_alive()
    assert done_at_kill < n, "the run had finished before the actor was killed: nothing was tested"
    assert victims[0] not in _encoder_pids()
    a, b = load_embeddings(tmp_path / "local"), load_embeddings(out)
    assert b.image_metadata["pair_id"].tolist() == list(range(1600))  # none missing, none twice, in order
    pd.testing.assert_frame_equal(a.image_metadata.drop(columns="row"), b.image_metadata.drop(columns="row"))
    pd.testing.assert_frame_equal(a.text_metadata.drop(columns="row"), b.text_metadata.drop(columns="row"))
    np.testing.assert_allclose(a.image, b.image, atol=2e-6)
    np.testing.assert_allclose(a.text, b.text, atol=2e-6)


def test_a_rerun_is_a_no_op_and_a_partial_one_redoes_only_what_is_missing(ray_instance, tiny_export, tmp_path):
    out = tmp_path / "ray"
    cfg = _cfg(tiny_export, "generated:val:90", out, engine="ray", shards=3)
    embed_dataset(cfg)
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = embed_dataset(cfg)
    assert again.images == 0 and again.merged and again.shards_written == []
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files

    shard_paths(out, 1)["manifest"].unlink()  # as a run killed before shard 1 was complete leaves it
    (out / "manifest.json").unlink()
    partial = embed_dataset(cfg)
    assert partial.shards_written == [1] and partial.images == 30 and partial.merged
    for i in (0, 2):
        for path in shard_paths(out, i).values():
            assert path.stat().st_mtime_ns == files[path]
    assert len(load_embeddings(out).image) == 90


def test_sweep_on_ray_resumes_with_an_alpha_added(ray_instance, tmp_path):
    tiny = ["--steps", "6", "--set", "train.batch_size=16", "--set", "data.synth_train_images=64", "--set",
            "data.val_max_images=16", "--set", "train.guard_every=0", "--set", "data.num_workers=0", "--max-images",
            "40", "--fit-images", "30", "--decoder-epochs", "1", "--no-baselines", "--engine", "ray"]
    out = tmp_path / "sweep"
    r = runner.invoke(app, ["sweep", "--alphas", "0,0.5", *tiny, "--out", str(out)])
    assert r.exit_code == 0, r.output
    first = json.loads((out / "sweep.json").read_text())
    assert sorted(j["name"] for j in first["jobs"]) == ["a0", "a0.5"]
    assert all(j["fit"] == "fitted" and j["eval"] == "evaluated" for j in first["jobs"])
    model = out / "runs" / "a0.5" / "model" / "open_clip_model.safetensors"
    before = model.read_bytes()

    r = runner.invoke(app, ["sweep", "--alphas", "0,0.5,1", *tiny, "--out", str(out)])
    assert r.exit_code == 0, r.output
    jobs = {j["name"]: j for j in json.loads((out / "sweep.json").read_text())["jobs"]}
    assert {k: (j["fit"], j["eval"]) for k, j in jobs.items()} == {
        "a0": ("kept", "kept"), "a0.5": ("kept", "kept"), "a1": ("fitted", "evaluated")}
    assert model.read_bytes() == before
    assert (out / "runs" / "a1" / "model" / "open_clip_model.safetensors").is_file()


def test_a_request_no_node_can_grant_is_refused_before_scheduling(ray_instance, tiny_export, tmp_path):
    cfg = _cfg(tiny_export, "generated:val:20", tmp_path / "emb", engine="ray",
               cluster=RayOptions(gpus_per_actor=1))
    with pytest.raises(ClusterError, match="asks for 1 GPU.*has 0"):
        embed_dataset(cfg)
    assert not (tmp_path / "emb" / "shards").exists()


def test_a_path_a_node_cannot_read_or_write_is_named(ray_instance, tiny_export, tmp_path):
    with pytest.raises(ClusterError, match=r"node .*: .*nowhere/export is missing"):
        check_every_node(read=[str(tmp_path / "nowhere" / "export")])
    with pytest.raises(ClusterError, match=r"node .*: the export at .* has fingerprint [0-9a-f]+, not deadbeef"):
        check_every_node(exports={str(tiny_export.out): "deadbeef"})
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ClusterError, match=r"cannot write to .*a_file/out"):
        check_every_node(write=[str(tmp_path / "a_file" / "out")])
    with pytest.raises(ClusterError, match=r"cannot write to .*a_file/emb.*nothing was scheduled"):
        embed_dataset(_cfg(tiny_export, "generated:val:20", tmp_path / "a_file" / "emb", engine="ray"))


def test_an_unreachable_cluster_is_named_before_any_work(tiny_export, tmp_path):
    r = subprocess.run([sys.executable, "-m", "cmalign.cli.main", "embed", str(tiny_export.out), "--data",
                        "generated:val:20", "--out", str(tmp_path / "emb"), "--engine", "ray", "--address",
                        "127.0.0.1:1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in r.stderr
    assert not (tmp_path / "emb" / "shards").exists()


def test_without_ray_the_engine_names_the_extra(tiny_export, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` raises ImportError
    with pytest.raises(MissingDependencyError, match=r"cmalign\[ray\]"):
        embed_dataset(_cfg(tiny_export, "generated:val:20", tmp_path / "emb", engine="ray"))


def test_the_local_engine_never_imports_ray(tiny_export, tmp_path):
    code = ("import sys; from cmalign.corpus.embed import EmbedConfig, embed_dataset; "
            f"embed_dataset(EmbedConfig(export={str(tiny_export.out)!r}, data='generated:val:20', "
            f"out={str(tmp_path / 'emb')!r})); assert 'ray' not in sys.modules, 'ray was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_the_cli_says_what_it_wrote_and_when_there_is_nothing_to_do(ray_instance, tiny_export, tmp_path):
    args = ["embed", str(tiny_export.out), "--data", "generated:val:40", "--out", str(tmp_path / "emb"), "--engine",
            "ray", "--shards", "2", "--batch-size", "8"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "shard(s) 0, 1 of 2 on Ray: 40 images, 200 texts, 0 skipped" in " ".join(r.output.split())
    assert "merged 2 shard(s)" in r.output
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "nothing to do: all 2 shard(s)" in r.output, r.output


def test_more_shards_than_images_writes_the_empty_ones_as_local_does(ray_instance, tiny_export, tmp_path):
    result = embed_dataset(_cfg(tiny_export, "generated:val:3", tmp_path / "ray", engine="ray", shards=5))
    assert sorted(result.shards_written) == [0, 1, 2, 3, 4] and result.merged and result.images == 3
    for i in range(5):
        embed_dataset(_cfg(tiny_export, "generated:val:3", tmp_path / "local", shard=f"{i}/5"))
    _same_directory(tmp_path / "local", tmp_path / "ray", 5)
