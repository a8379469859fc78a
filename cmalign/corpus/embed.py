"""`cmalign embed`: run an export over a data set and write the embeddings directory.

Torch-free: the ONNX runtime, the torch-free preprocessing/tokenizer and the data readers. Image
decoding runs in a thread pool ahead of inference (PIL and onnxruntime both release the GIL), with
a bounded look-ahead. ``shard="i/n"`` embeds the i-th of n equal slices of the data set's images
(with all their captions), so any scheduler can fan the work out; each shard writes its own files
and the last one to finish merges (see :mod:`cmalign.corpus.store`).

A shard's files are written complete in a hidden staging directory inside OUT and then moved into place
together, its own manifest last: a run stopped at any point (a kill -9 too) leaves the directory as it was,
and an ``--overwrite`` keeps the old merged embeddings usable until the new shard is complete.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import cmalign
from cmalign.artifacts.atomic import atomic_write, staging_dir, write_json
from cmalign.artifacts.outputs import refuse_inputs
from cmalign.cluster.connect import RayOptions
from cmalign.corpus.store import (
    EmbeddingsError,
    check_compatible,
    merge_shards,
    merged_manifest,
    parse_shard,
    read_shard_manifests,
    save_array,
    save_metadata,
    shard_name,
    shard_paths,
)
from cmalign.data.options import ReaderOptions
from cmalign.data.records import BadSample, Record
from cmalign.errors import ConfigError, OutputExistsError
from cmalign.export.prefetch import prefetch_map
from cmalign.export.runtime import NO_SPINNING, ExportedModel

GENERATED_PREFIX = "generated:"
SESSION_CONFIG = NO_SPINNING  # the decoding threads and the tokenizer share the cores with inference


@dataclass
class EmbedConfig(ReaderOptions):
    """What `cmalign embed` embeds, and how; how to read ``data`` is the inherited ReaderOptions (keywords)."""

    export: str
    data: str = "generated:val"  # a data file/folder in any `fit` format, or generated:train|val|test[:IMAGES]
    out: str = "emb/corpus"
    shard: str = "0/1"
    provider: str = "cpu"
    variant: str = "fp32"
    batch_size: int = 64  # images per inference batch (texts use 4x)
    workers: int = 2  # image decoding threads
    threads: int | None = None  # onnxruntime intra-op threads (default: onnxruntime's)
    dtype: str = "float32"  # or float16, to halve the files
    overwrite: bool = False
    engine: str = "local"  # or "ray": the same directory, computed on a Ray cluster (cmalign.cluster.embed)
    shards: int | None = None  # ray: shards the run writes (default: one per 100,000 images)
    cluster: RayOptions = field(default_factory=RayOptions)  # ray: where, and what each actor asks for


@dataclass
class EmbedResult:
    out: Path
    shard: tuple[int, int]
    images: int
    texts: int
    skipped: list[BadSample] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole call
    setup_seconds: float = 0.0  # of which: loading the export (checksums, sessions) and reading the data set
    merged: dict | None = None  # the merged manifest, once every shard is there
    shards_written: list[int] = field(default_factory=list)  # by this call (ray: the missing ones; [] = nothing to do)
    encoding: tuple[float, float] | None = None  # ray: seconds from the call's start to when the first actor began
    # encoding (Ray and the actors started) and to when the last one finished: the pipeline's running time


@dataclass
class _Pair:
    pair_id: int
    image: Record  # the first record of the image
    captions: list[Record]


def _generated_size(spec: str, size: str) -> int | None:
    """``generated:train:20000`` asks for 20,000 scenes (a corpus of any size for load tests); none: the split's."""
    if not size:
        return None
    if not size.isdigit() or int(size) < 1:
        raise ConfigError(f"--data {spec}: the size after the split must be a whole number of images >= 1, "
                          f"got {size!r} (e.g. generated:train:20000)")
    return int(size)


def read_corpus(cfg: EmbedConfig) -> tuple[list[_Pair], list[BadSample], dict]:
    """Group records by image (in order of first appearance); pair_id is that position."""
    if cfg.data.startswith(GENERATED_PREFIX):
        from cmalign.data.synth import synth_split

        split, _, size = cfg.data[len(GENERATED_PREFIX):].partition(":")
        records, skipped = synth_split(split, n_images=_generated_size(cfg.data, size)).records, []
        description = {"path": cfg.data, "format": "generated"}
    else:
        from cmalign.data.splits import read_records

        records, skipped = read_records(cfg.data, cfg)
        description = {"path": str(Path(cfg.data).resolve()), "format": cfg.format}
    pairs: dict[str, _Pair] = {}
    for r in records:
        p = pairs.get(r.key)
        if p is None:
            p = pairs[r.key] = _Pair(len(pairs), r, [])
        p.captions.append(r)
    description.update(images=len(pairs), texts=len(records))
    return list(pairs.values()), list(skipped), description


def _image_path(r: Record) -> str:
    return r.image if isinstance(r.image, str) else str(getattr(r.image, "path", "") or r.key)


def check_embed_settings(cfg: EmbedConfig) -> None:
    if cfg.engine not in ("local", "ray"):
        raise ConfigError(f"--engine must be local or ray, got {cfg.engine!r}")
    if cfg.dtype not in ("float32", "float16"):
        raise ConfigError(f"dtype must be float32 or float16, got {cfg.dtype!r}")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {cfg.batch_size}")


def embed_dataset(cfg: EmbedConfig, progress: Callable[[str, int, int], None] | None = None,
                  log: Callable[[str], None] | None = None) -> EmbedResult:
    """Embed one shard of ``cfg.data`` with ``cfg.export`` (``engine="ray"``: every missing shard, on a Ray
    cluster); merge when every shard is done."""
    if cfg.engine == "ray":
        from cmalign.cluster.embed import embed_on_ray

        return embed_on_ray(cfg, progress, log)
    t0 = time.time()
    index, n = parse_shard(cfg.shard)
    check_embed_settings(cfg)
    # shards written into the export, or into a folder data set, would mix with what they are read from
    refuse_inputs(cfg.out, [cfg.export, cfg.data if cfg.data and Path(cfg.data).is_dir() else None])
    model = ExportedModel(cfg.export, provider=cfg.provider, variant=cfg.variant, threads=cfg.threads,
                          session_config=SESSION_CONFIG)
    out = Path(cfg.out)
    paths = shard_paths(out, index)
    pairs, skipped, data_desc = read_corpus(cfg)
    setup_seconds = time.time() - t0

    identity = shard_identity(cfg, model, data_desc, n)
    done = read_shard_manifests(out)
    for i, existing in done.items():  # in shard order: another shard's mismatch is named before "already done"
        if i == index and not cfg.overwrite:
            unmerged = (f"; all {n} shards are there but not merged: `cmalign embed-merge {out}` merges them"
                        if len(done) == n and not (out / "manifest.json").is_file() else "")
            raise OutputExistsError(f"{paths['manifest']} exists: shard {index}/{n} is already done "
                                    f"(pass --overwrite to redo it){unmerged}")
        if i != index:  # the shard being redone is replaced whatever made it; the others must match the new one
            check_compatible(existing, identity, str(shard_paths(out, i)["manifest"]))

    mine = slice_pairs(pairs, index, n)
    img_emb, img_rows, bad = _embed_images(model, mine, cfg, progress)
    kept = [p for p in mine if p.pair_id not in bad]
    txt_emb = _embed_texts(model, [r.caption for p in kept for r in p.captions], cfg, progress)
    # Samples the reader already skipped belong to no slice: only shard 0 lists (and counts) them, so
    # the merged total counts each once instead of once per shard.
    written = write_shard(cfg, identity, index, mine, bad, img_emb, img_rows, txt_emb,
                          skipped if index == 0 else [], started=t0, setup_seconds=setup_seconds,
                          providers=model.providers)
    result = EmbedResult(out=out, shard=(index, n), images=len(img_rows), texts=len(txt_emb),
                         skipped=written.skipped, seconds=written.seconds, setup_seconds=setup_seconds,
                         merged=written.merged, shards_written=[index])
    if result.merged is None:
        result.merged = merge_if_complete(out, n)
    return result


def shard_identity(cfg: EmbedConfig, model: ExportedModel, data_desc: dict, n: int) -> dict:
    """What every shard of one directory must share, whichever engine or machine wrote it."""
    return {"export": str(Path(cfg.export).resolve()), "export_fingerprint": model.fingerprint,
            "model": {k: model.manifest.get(k) for k in ("alpha_target", "config_hash")} |
                     {"source": model.manifest.get("source", {}).get("open_clip_name")},
            "variant": cfg.variant, "embed_dim": model.embed_dim, "dtype": cfg.dtype, "data": data_desc,
            "num_shards": n}


def check_existing_shards(out: Path, done: dict[int, dict], identity: dict) -> None:
    for i, existing in done.items():
        check_compatible(existing, identity, str(shard_paths(out, i)["manifest"]))


def slice_pairs(pairs: list[_Pair], index: int, n: int) -> list[_Pair]:
    """The images (with all their captions) of shard ``index`` of ``n``: contiguous, in data set order."""
    return pairs[index * len(pairs) // n:(index + 1) * len(pairs) // n]


def merge_if_complete(out: Path, n: int) -> dict | None:
    """Merge when every shard is there (another one may have finished meanwhile); None while one is missing."""
    if len(read_shard_manifests(out)) != n:
        return None
    try:
        return merge_shards(out)
    except EmbeddingsError:
        return None  # another shard is still writing; `cmalign embed-merge` finishes the job


TEXT_WINDOW = 16  # text batches sorted by length together (16 x 256 captions: ~2 MB of token ids)


@dataclass
class WrittenShard:
    skipped: list[BadSample]
    seconds: float
    merged: dict | None


def write_shard(cfg: EmbedConfig, identity: dict, index: int, mine: list[_Pair], bad: dict[int, BadSample],
                img_emb: np.ndarray, img_rows: list[int], txt_emb: np.ndarray, skipped: list[BadSample], *,
                started: float, setup_seconds: float, providers: list, engine: dict | None = None) -> WrittenShard:
    """Write shard ``index`` of ``mine``'s pairs: ``img_emb`` holds the images of ``img_rows`` (the pairs not in
    ``bad``, in order), ``txt_emb`` their captions in order; ``skipped`` the reader's bad samples (shard 0 only).
    Both engines write through here, so their directories are the same file for file."""
    out, n = Path(cfg.out), identity["num_shards"]
    skipped = list(skipped)
    kept = [p for p in mine if p.pair_id not in bad]
    for p in mine:
        if p.pair_id in bad:
            skipped.append(bad[p.pair_id])
            skipped.extend(BadSample(r.source, "caption", "its image was skipped") for r in p.captions)
    captions = [r for p in kept for r in p.captions]
    if len(txt_emb) != len(captions) or len(img_emb) != len(img_rows):
        raise EmbeddingsError(f"shard {index}: {len(img_emb)} image and {len(txt_emb)} text embeddings for "
                              f"{len(img_rows)} images and {len(captions)} captions")
    owner = {p.pair_id: p for p in kept}
    pair_of = {id(r): p.pair_id for p in kept for r in p.captions}
    meta: dict[str, list] = {c: [] for c in ("modality", "row", "pair_id", "image_path", "caption", "label", "key",
                                             "source")}
    for row, pid in enumerate(img_rows):
        r = owner[pid].image
        _add_row(meta, "image", row, pid, _image_path(r), r.caption, r)
    for row, r in enumerate(captions):
        _add_row(meta, "text", row, pair_of[id(r)], _image_path(r), r.caption, r)

    dtype = np.float16 if cfg.dtype == "float16" else np.float32
    with staging_dir(out, f"shard_{shard_name(index)}") as stage:
        staged = shard_paths(stage, index)
        save_array(staged["image"], img_emb.astype(dtype))
        save_array(staged["text"], txt_emb.astype(dtype))
        save_metadata(staged["metadata"], meta)
        with atomic_write(staged["bad"]) as f:
            for b in skipped:
                f.write(json.dumps(b.to_dict()) + "\n")
        seconds = time.time() - started
        settings = {k: v for k, v in asdict(cfg).items()
                    if k not in ("export", "out", "overwrite", *(() if engine else ("engine", "shards", "cluster")))}
        settings["shard"] = f"{index}/{n}"
        manifest = {
            **identity, "kind": "cmalign-embeddings-shard", "shard": index, "cmalign_version": cmalign.__version__,
            "rows": {"images": len(img_rows), "texts": len(captions)}, "skipped": len(skipped),
            "seconds": round(seconds, 2), "setup_seconds": round(setup_seconds, 2), "providers": providers,
            "settings": settings, **({"engine": engine} if engine else {}),
        }
        write_json(staged["manifest"], manifest)
        merged = _stage_merge(out, stage, index, n, manifest)
        _move_in(stage, out, index, merged is not None)
    return WrittenShard(skipped, seconds, merged)


def _stage_merge(out: Path, stage: Path, index: int, n: int, manifest: dict) -> dict | None:
    """When this shard completes the directory, its merged manifest, written into the stage (None otherwise)."""
    shards = {**read_shard_manifests(out), index: manifest}
    if len(shards) != n:
        return None
    try:
        merged = merged_manifest(out, shards, files_in={index: stage})
    except EmbeddingsError:
        return None  # another shard is still writing; `cmalign embed-merge` finishes the job
    write_json(stage / "manifest.json", merged)
    return merged


def _move_in(stage: Path, out: Path, index: int, merged: bool) -> None:
    """Move a complete staged shard into ``out``: only renames, so the directory is in between for microseconds.

    The old merged manifest goes first: it must not vouch for a mix of old and new files (a run stopped in between
    leaves the directory unmerged; `cmalign embed-merge`, or the shard run again with --overwrite, merges it). The
    shard's own manifest, which marks it done, moves after its files, and the new merged manifest last.
    """
    staged, final = shard_paths(stage, index), shard_paths(out, index)
    for path in final.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    for kind in ("image", "text", "metadata", "bad", "manifest"):
        os.replace(staged[kind], final[kind])
    if merged:
        os.replace(stage / "manifest.json", out / "manifest.json")


def _add_row(meta, modality, row, pair_id, image_path, caption, r: Record) -> None:
    for k, v in (("modality", modality), ("row", row), ("pair_id", pair_id), ("image_path", image_path),
                 ("caption", caption), ("label", r.label), ("key", r.key), ("source", r.source)):
        meta[k].append(v)


def _rgb8(model: ExportedModel, r: Record) -> np.ndarray:
    """As ``ExportedModel.encode_images`` (and open_clip) do: resize and crop the decoded image, then convert
    to RGB (normalised later, a batch at a time). Converting first (``load_image``) resamples palette (P mode)
    images differently."""
    return model.preprocessor.rgb8(r.image if isinstance(r.image, str) else r.image.load())


def _embed_images(model: ExportedModel, pairs: list[_Pair], cfg: EmbedConfig, progress):
    """Embeddings of the readable images, their pair ids, and a BadSample per unreadable one."""
    bad: dict[int, BadSample] = {}

    def prepare(batch: list[_Pair]):
        pixels, ids = [], []
        for p in batch:
            try:
                pixels.append(_rgb8(model, p.image))
                ids.append(p.pair_id)
            except Exception as e:  # PIL raises many types for missing or corrupt files
                bad[p.pair_id] = BadSample(p.image.source, "image", f"{type(e).__name__}: {e}")
        return (model.preprocessor.normalise(np.stack(pixels)) if pixels else None), ids

    batches = [pairs[i:i + cfg.batch_size] for i in range(0, len(pairs), cfg.batch_size)]
    embs, rows, done = [], [], 0
    for pixels, ids in prefetch_map(prepare, batches, workers=cfg.workers):
        if pixels is not None:
            embs.append(model.encode_pixels(pixels))
            rows.extend(ids)
        done += len(ids)
        if progress:
            progress("images", done + len(bad), len(pairs))
    emb = np.concatenate(embs) if embs else np.zeros((0, model.embed_dim), np.float32)
    return emb, rows, bad


def _embed_texts(model: ExportedModel, texts: list[str], cfg: EmbedConfig, progress) -> np.ndarray:
    step = cfg.batch_size * 4
    # Windows of TEXT_WINDOW batches: within one, captions run shortest first (each batch cut at its own longest
    # caption, see ExportedModel.encode_tokens_batched); the BPE tokenizer is Python, and one thread tokenises the
    # next window while onnxruntime runs this one.
    windows = [texts[i:i + step * TEXT_WINDOW] for i in range(0, len(texts), step * TEXT_WINDOW)]
    embs, done = [], 0
    for tokens in prefetch_map(model.tokenize, windows, workers=1):
        embs.append(model.encode_tokens_batched(tokens, step))
        done += len(tokens)
        if progress:
            progress("texts", done, len(texts))
    return np.concatenate(embs) if embs else np.zeros((0, model.embed_dim), np.float32)
