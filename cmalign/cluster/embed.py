"""`cmalign embed --engine ray`: the local engine's output, computed by a Ray Data pipeline.

    rows (one per image, with its captions) → decode + preprocess (Ray tasks) → encode (an actor pool, one
    onnxruntime session per actor) → this process, in data set order → shards written as the local engine writes
    them (:func:`cmalign.corpus.embed.write_shard`)

The driver reads the data set and writes the files, as the local engine does; workers only decode and encode, so
the export and the images must be readable on every node, and only this machine writes OUT. Order is the data
set's (Ray Data's ``preserve_order``), so shard ``i`` of ``n`` holds exactly what ``cmalign embed --shard i/n``
would write, and a shard is written the moment its last row arrives: an interrupted run keeps its finished shards
and a rerun embeds only the missing ones. A killed actor is restarted and its batch retried by Ray
(``max_restarts``/``max_task_retries``); rows arrive once each, in order, or the run fails.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cmalign.artifacts.outputs import refuse_inputs
from cmalign.cluster.connect import (
    ClusterError,
    check_every_node,
    check_fits,
    connect,
    path_problem,
    require_ray,
)
from cmalign.corpus.embed import (
    SESSION_CONFIG,
    EmbedConfig,
    EmbedResult,
    check_embed_settings,
    check_existing_shards,
    merge_if_complete,
    read_corpus,
    shard_identity,
    slice_pairs,
    write_shard,
)
from cmalign.corpus.store import EmbeddingsError, read_merged_manifest, read_shard_manifests
from cmalign.data.records import BadSample
from cmalign.export.runtime import ExportedModel

SHARD_IMAGES = 100_000  # default shard size: a finished shard survives an interruption; ~1 min of one GPU
# Rows per Ray Data block, at most. Each block costs Ray a task hand-off and object-store round trips (~ms), so
# blocks hold several inference batches; actors still run onnxruntime at --batch-size. Measured on the tiny model
# (benchmarks/ray_embed.py, 8000 images, running rate against the local engine): 64-row blocks 0.77, 256-row
# 0.84-0.94, 512-row 0.94-0.98. Small runs get smaller blocks so that every actor has work (:func:`_block_rows`).
BLOCK_ROWS = 512


def _decode(batch: dict, preprocessor) -> dict:
    """A Ray task: each row's image decoded, resized and cropped (uint8: a quarter of the bytes the normalised
    float32 pixels would take through the object store), or the error that made it unreadable."""
    pixels, errors = [], []
    for image in batch.pop("image"):
        try:  # as the local engine (cmalign.corpus.embed._rgb8): decode, resize, crop, then RGB
            pixels.append(preprocessor.rgb8(image if isinstance(image, str) else image.load()))
            errors.append("")
        except Exception as e:  # PIL raises many types for missing or corrupt files
            pixels.append(None)
            errors.append(f"{type(e).__name__}: {e}")
    shape = next((p.shape for p in pixels if p is not None), (0,))
    batch["pixels"] = np.stack([p if p is not None else np.zeros(shape, np.uint8) for p in pixels])
    batch["error"] = np.array(errors, dtype=object)
    return batch


class _Encoder:
    """A Ray actor: one onnxruntime session pair, loaded once, encoding decoded batches."""

    def __init__(self, settings: dict):
        import socket

        s = settings
        self.model = ExportedModel(s["export"], provider=s["provider"], variant=s["variant"], threads=s["threads"],
                                   session_config=SESSION_CONFIG)  # decode tasks share the node's cores
        if self.model.fingerprint != s["fingerprint"]:  # the export was changed on this node, or is another one
            raise ClusterError(f"{s['export']} on node {socket.gethostname()}: fingerprint {self.model.fingerprint}, "
                               f"but the driver's export has {s['fingerprint']}; every node must see the same export")
        self.image_batch, self.text_batch = s["image_batch"], s["text_batch"]

    def __call__(self, batch: dict) -> dict:
        began = time.time()
        ok = batch["error"] == ""
        d = self.model.embed_dim
        image = np.zeros((len(ok), d), np.float32)
        rows = np.flatnonzero(ok)
        for i in range(0, len(rows), self.image_batch):  # a block holds several inference batches
            mine = rows[i:i + self.image_batch]
            image[mine] = self.model.encode_pixels(self.model.preprocessor.normalise(batch["pixels"][mine]))
        captions = [list(c) if good else [] for c, good in zip(batch["captions"], ok, strict=True)]
        flat = [c for row in captions for c in row]
        text = self.model.encode_tokens_batched(self.model.tokenize(flat), self.text_batch) if flat \
            else np.zeros((0, d), np.float32)
        ends = np.cumsum([len(row) for row in captions])
        per_row = np.empty(len(ok), dtype=object)  # ragged: Ray Data stores it as a variable-shaped tensor column
        per_row[:] = [text[e - len(row):e] for e, row in zip(ends, captions, strict=True)]
        return {"shard": batch["shard"], "pair_id": batch["pair_id"], "error": batch["error"], "image_emb": image,
                "text_emb": per_row, "began": np.full(len(ok), began), "ended": np.full(len(ok), time.time())}


def _resources(cfg: EmbedConfig, cluster_cpus: float) -> tuple[float, float, int]:
    """CPUs and GPUs each encoder actor asks for, and its onnxruntime threads."""
    opts = cfg.cluster
    gpus = opts.gpus_per_actor if opts.gpus_per_actor is not None else (1.0 if cfg.provider == "cuda" else 0.0)
    if opts.cpus_per_actor is not None:
        cpus = opts.cpus_per_actor
    elif gpus:
        cpus = 1.0
    else:  # leave a quarter of the cluster's CPUs to the decode tasks, or actors holding them all starve decoding
        cpus = min(1.0, 0.75 * cluster_cpus / opts.actors)
    threads = cfg.threads or max(1, round(cpus))
    return cpus, gpus, threads


def embed_on_ray(cfg: EmbedConfig, progress: Callable[[str, int, int], None] | None = None,
                 log: Callable[[str], None] | None = None) -> EmbedResult:
    """Embed every missing shard of ``cfg.data`` on a Ray cluster (``cfg.cluster``) and merge; see the module."""
    t0 = time.time()
    check_embed_settings(cfg)
    cfg.cluster.check()
    if cfg.shard != "0/1":
        raise ClusterError("--shard is for the local engine; with --engine ray, --shards N sets how many shards "
                           "the run writes (Ray fans them out)")
    if cfg.shards is not None and cfg.shards < 1:
        raise ClusterError(f"--shards must be at least 1, got {cfg.shards}")
    require_ray()
    refuse_inputs(cfg.out, [cfg.export, cfg.data if cfg.data and Path(cfg.data).is_dir() else None])
    # The driver checks the export and reads its identity on the CPU (a head node may have no GPU); actors run it.
    model = ExportedModel(cfg.export, provider="cpu", variant=cfg.variant, threads=1)
    out = Path(cfg.out)
    pairs, reader_skipped, data_desc = read_corpus(cfg)
    n = cfg.shards or max(1, math.ceil(len(pairs) / SHARD_IMAGES))
    identity = shard_identity(cfg, model, data_desc, n)
    done = read_shard_manifests(out)
    todo = [i for i in range(n) if cfg.overwrite or i not in done]
    check_existing_shards(out, {i: m for i, m in done.items() if i not in todo}, identity)  # redone ones: replaced
    result = EmbedResult(out=out, shard=(0, n), images=0, texts=0)
    if not todo:  # a finished job: nothing to schedule, nothing rewritten (merged now if it was not yet)
        try:
            result.merged = read_merged_manifest(out)
        except EmbeddingsError:
            result.merged = merge_if_complete(out, n)
        result.seconds = result.setup_seconds = time.time() - t0
        return result
    problem = path_problem([], [str(out)])  # only this process writes OUT
    if problem:
        raise ClusterError(f"{problem}; nothing was scheduled")
    info = connect(cfg.cluster.address, log)
    images = [p.image.image for p in pairs[:1] if isinstance(p.image.image, str)]  # decode tasks open image files
    check_every_node(read=[cfg.export, *images], exports={cfg.export: model.fingerprint})
    cpus, gpus, threads = _resources(cfg, info["cpus"])
    check_fits(info, cpus, gpus, "--cpus-per-actor / --gpus-per-actor")
    setup_seconds = time.time() - t0

    slices = {i: slice_pairs(pairs, i, n) for i in todo}
    rows = [{"shard": i, "pair_id": p.pair_id, "image": p.image.image, "captions": [r.caption for r in p.captions]}
            for i, mine in slices.items() for p in mine]
    by_id = {p.pair_id: p for p in pairs}
    engine = {"name": "ray", "address": info["address"], "nodes": info["nodes"], "actors": cfg.cluster.actors,
              "cpus_per_actor": cpus, "gpus_per_actor": gpus, "threads_per_actor": threads}
    if log:
        log(f"{len(rows)} images in {len(todo)} of {n} shard(s) on {info['nodes']} node(s) "
            f"({info['cpus']:g} CPUs, {info['gpus']:g} GPUs): {cfg.cluster.actors} encoder actor(s) × "
            f"{cpus:g} CPU / {gpus:g} GPU")

    batches = ()
    if rows:
        batches = _pipeline(cfg, model, rows, cpus, gpus, threads).iter_batches(batch_size=None, batch_format="numpy")
    total_images = len(rows)
    total_texts = sum(len(r["captions"]) for r in rows)
    seen_images = seen_texts = 0
    current: int | None = None
    acc: list[tuple[int, str, np.ndarray, np.ndarray]] = []

    def flush(shard: int) -> None:
        mine = slices[shard]
        if [a[0] for a in acc] != [p.pair_id for p in mine]:
            raise ClusterError(f"shard {shard}: {len(acc)} rows came back for {len(mine)} images, or out of "
                               "order; nothing of it was written. Run the command again to redo it")
        bad = {pid: BadSample(by_id[pid].image.source, "image", err) for pid, err, _, _ in acc if err}
        good = [a for a in acc if not a[1]]
        d = model.embed_dim
        img = np.stack([a[2] for a in good]) if good else np.zeros((0, d), np.float32)
        txt = np.concatenate([a[3] for a in good]) if good else np.zeros((0, d), np.float32)
        written = write_shard(cfg, identity, shard, mine, bad, img, [a[0] for a in good], txt,
                              reader_skipped if shard == 0 else [], started=t0, setup_seconds=setup_seconds,
                              providers=[f"ray:{cfg.provider}"], engine=engine)
        result.images += len(good)
        result.texts += len(txt)
        result.skipped.extend(written.skipped)
        result.merged = written.merged or result.merged
        result.shards_written.append(shard)
        acc.clear()

    # more shards than images: the empty ones are written as the local engine writes them
    for shard in [i for i, mine in slices.items() if not mine]:
        flush(shard)
    for batch in batches:
        for shard, pid, err, img, txt in zip(batch["shard"], batch["pair_id"], batch["error"], batch["image_emb"],
                                             batch["text_emb"], strict=True):
            shard = int(shard)
            if current is not None and shard != current:
                flush(current)
            current = shard
            acc.append((int(pid), str(err), np.asarray(img, np.float32),
                        np.asarray(txt, np.float32).reshape(-1, model.embed_dim)))
            seen_images += 1
            seen_texts += len(acc[-1][3]) if not err else len(by_id[int(pid)].captions)
        first, last = float(batch["began"].min()) - t0, float(batch["ended"].max()) - t0
        result.encoding = (min(first, result.encoding[0]), max(last, result.encoding[1])) if result.encoding \
            else (first, last)
        if progress:
            progress("images", seen_images, total_images)
            progress("texts", seen_texts, total_texts)
    if current is not None:
        flush(current)
    missing = sorted(set(todo) - set(result.shards_written))
    if missing:
        raise ClusterError(f"shards {missing} got no rows back from the cluster; run the command again")
    result.seconds, result.setup_seconds = time.time() - t0, setup_seconds
    if result.merged is None:
        result.merged = merge_if_complete(out, n)
    return result


def _block_rows(rows: int, batch_size: int, actors: int) -> int:
    """Rows per block: at least one inference batch, at most BLOCK_ROWS, and four blocks per actor if the rows allow
    (fewer blocks than actors would leave actors idle; a few per actor let decoding run ahead of encoding)."""
    return max(batch_size, min(BLOCK_ROWS, math.ceil(rows / (4 * actors))))


def _pipeline(cfg: EmbedConfig, model: ExportedModel, rows: list[dict], cpus: float, gpus: float, threads: int):
    """The Ray Data dataset: rows → decode tasks → encoder actors, in input order."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards are contiguous slices: rows must come back in order
    ctx.enable_progress_bars = False  # this command draws its own
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its INFO/WARNING lines would interleave our bars
    block = _block_rows(len(rows), cfg.batch_size, cfg.cluster.actors)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / block)))
    ds = ds.map_batches(functools.partial(_decode, preprocessor=model.preprocessor), batch_size=block,
                        num_cpus=cfg.cluster.decode_cpus)
    settings = {"export": str(Path(cfg.export).resolve()), "provider": cfg.provider, "variant": cfg.variant,
                "threads": threads, "fingerprint": model.fingerprint, "image_batch": cfg.batch_size,
                "text_batch": cfg.batch_size * 4}
    # Ray Data restarts a dead actor and retries its batch without limit by default (max_restarts and
    # max_task_retries -1), and retries a task whose worker died: what makes a killed worker cost only time.
    return ds.map_batches(_Encoder, fn_constructor_args=(settings,), batch_size=block,
                          compute=ray.data.ActorPoolStrategy(size=cfg.cluster.actors), num_cpus=cpus,
                          **({"num_gpus": gpus} if gpus else {}))
