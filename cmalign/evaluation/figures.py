"""The report's PNG figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MODALITY_COLOURS = {"image": "#1f77b4", "text": "#d62728"}


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tsne(points: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    perplexity = min(30.0, max(2.0, (len(points) - 1) / 3))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed, metric="cosine").fit_transform(points)


def embedding_map(path: Path, embedded: dict, data, cfg) -> None:
    """t-SNE of images and their first captions, one row per system: coloured by modality, then by class."""
    plt = pyplot()
    names = [n for n in ("baseline", "model") if n in embedded]
    rng = np.random.default_rng(cfg.seed)
    n_img = len(data.eval.images)
    pick = np.sort(rng.choice(n_img, size=min(cfg.map_points, n_img), replace=False))
    labels = np.asarray(data.eval.labels)[pick] if data.eval.labels is not None else None
    cols = 2 if labels is not None else 1
    fig, axes = plt.subplots(len(names), cols, figsize=(5.2 * cols, 4.6 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        e = embedded[name]
        pts = _tsne(np.concatenate([e.image[pick], e.first_captions(data)[pick]]), cfg.seed)
        img, txt = pts[: len(pick)], pts[len(pick):]
        title = {"baseline": "before (baseline)", "model": "after (model)" if "baseline" in embedded else "model"}
        ax = axes[row, 0]
        ax.scatter(*img.T, s=7, c=MODALITY_COLOURS["image"], label="image", alpha=0.7)
        ax.scatter(*txt.T, s=7, c=MODALITY_COLOURS["text"], label="caption", alpha=0.7, marker="^")
        ax.set_title(f"{title[name]}: by modality")
        ax.legend(loc="best", fontsize=8)
        if labels is not None:
            ax = axes[row, 1]
            classes = sorted(set(labels))
            cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
            for i, c in enumerate(classes[:20]):
                m = labels == c
                ax.scatter(*img[m].T, s=7, color=cmap(i % cmap.N), label=str(c), alpha=0.7)
                ax.scatter(*txt[m].T, s=9, color=cmap(i % cmap.N), alpha=0.7, marker="^")
            ax.set_title(f"{title[name]}: by class (● image, ▲ caption)")
            ax.legend(loc="best", fontsize=6, ncol=2)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"t-SNE of {len(pick)} images and their first captions (cosine, seed {cfg.seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gap_bars(path: Path, systems: dict) -> None:
    """One small panel per gap measure, a bar per system."""
    plt = pyplot()
    measures = ("raw", "centroid", "paired_residual", "mmd2", "bures", "rmg")
    names = [n for n in systems if "gap" in systems[n]]
    fig, axes = plt.subplots(1, len(measures), figsize=(2.6 * len(measures), 3.4))
    colours = plt.get_cmap("tab10")
    for ax, m in zip(axes, measures, strict=True):
        values = [systems[n]["gap"][m] for n in names]
        ax.bar(range(len(names)), values, color=[colours(i) for i in range(len(names))])
        ax.set_title(m, fontsize=10)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.axhline(0, color="black", lw=0.5)
    fig.suptitle("gap decomposition (lower = more aligned)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


TASK_AXES = (("retrieval", "i2t_R@1", "retrieval i→t R@1"), ("zeroshot", "top1", "zero-shot top-1"),
             ("clustering", "kmeans_ari", "joint KMeans ARI"), ("caption", "cider_d", "caption CIDEr-D"),
             ("mixed", "text_query_image_share@{k}", "text query: image share@k"))


def tasks_vs_gap(path: Path, systems: dict, k: int) -> None:
    """Each task metric against the raw and the distribution gap, one point per system."""
    plt = pyplot()
    axes_spec = [(t, key.format(k=k), label) for t, key, label in TASK_AXES
                 if any(t in s and key.format(k=k) in s[t] for s in systems.values())]
    names = [n for n in systems if "gap" in systems[n]]
    if not axes_spec or not names:
        return
    fig, axes = plt.subplots(2, len(axes_spec), figsize=(3.2 * len(axes_spec), 6.2), squeeze=False)
    colours = plt.get_cmap("tab10")
    for col, (task, key, label) in enumerate(axes_spec):
        for row, (measure, mlabel) in enumerate((("raw", "raw gap"), ("mmd2", "MMD² (distribution gap)"))):
            ax = axes[row, col]
            for i, n in enumerate(names):
                if task in systems[n]:
                    ax.scatter(systems[n]["gap"][measure], systems[n][task][key], color=colours(i), label=n, s=30)
            ax.set_xlabel(mlabel, fontsize=8)
            ax.locator_params(axis="x", nbins=4)
            ax.set_ylabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle("task metrics against the gap, one point per system")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mixed_corpus_curve(path: Path, systems: dict, k: int) -> None:
    """NDCG@k of text queries against the share p of documents stored as images, one line per system: an
    unaligned space sags in the middle (a U), an aligned one stays flat (GR-CLIP's MixBench plot)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, s in systems.items():
        curve = sorted((float(key.split("=")[1]), v) for key, v in s.get("mixcorpus", {}).items()
                       if key.startswith(f"ndcg@{k}_p="))
        if curve:
            ax.plot(*zip(*curve, strict=True), marker="o", label=name)
    ax.set_xlabel("p: share of documents stored as images")
    ax.set_ylabel(f"NDCG@{k} of text queries")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("mixed-modality corpus", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_figures(out: Path, embedded: dict, systems: dict, data, cfg) -> list[str]:
    written = []
    if "mixcorpus" in cfg.tasks:
        mixed_corpus_curve(out / "mixed_corpus.png", systems, cfg.k)
        written.append("mixed_corpus.png")
    if "gap" in cfg.tasks:
        gap_bars(out / "gap_decomposition.png", systems)
        written.append("gap_decomposition.png")
        tasks_vs_gap(out / "tasks_vs_gap.png", systems, cfg.k)
        if (out / "tasks_vs_gap.png").exists():
            written.append("tasks_vs_gap.png")
    embedding_map(out / "embedding_map.png", embedded, data, cfg)
    written.append("embedding_map.png")
    return written
