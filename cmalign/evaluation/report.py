"""report.md — the tables a person reads — and the short summary printed to the terminal."""

from __future__ import annotations

from pathlib import Path

from cmalign.artifacts.atomic import atomic_write

# (task, key, label, higher is better) rows of the summary and the per-task tables
SUMMARY_ROWS = (
    ("gap", "raw", "raw gap", False),
    ("gap", "centroid", "centroid gap", False),
    ("gap", "mmd2", "MMD² (distribution)", False),
    ("gap", "rmg", "RMG", False),
    ("retrieval", "i2t_R@1", "R@1 image→text", True),
    ("retrieval", "t2i_R@1", "R@1 text→image", True),
    ("mixed", "text_query_image_share@{k}", "text query: images@{k}", True),
    ("mixed", "image_query_text_share@{k}", "image query: texts@{k}", True),
    ("clustering", "kmeans_ari", "KMeans ARI (joint)", True),
    ("clustering", "hdbscan_ari", "HDBSCAN ARI (joint)", True),
    ("zeroshot", "top1", "zero-shot top-1", True),
    ("caption", "cider_d", "CIDEr-D from images", True),
)

TASK_TITLES = {
    "gap": "Gap decomposition",
    "retrieval": "Cross-modal retrieval",
    "mixed": "Mixed-modality retrieval (one joint index of images and captions)",
    "clustering": "Joint clustering (images + one class-prompt text each)",
    "zeroshot": "Zero-shot classification (the cost of alignment)",
    "caption": "Caption-prefix quality",
}


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def summary_rows(metrics: dict) -> list[tuple[str, list[str]]]:
    """(label, one cell per system) for the headline figures present."""
    systems = metrics["systems"]
    k = metrics["settings"]["k"]
    rows = []
    for task, key, label, _ in SUMMARY_ROWS:
        key, label = key.format(k=k), label.format(k=k)
        if any(task in s and key in s[task] for s in systems.values()):
            rows.append((label, [_fmt(s.get(task, {}).get(key)) if task in s else "—" for s in systems.values()]))
    return rows


def _system_title(name: str, metrics: dict) -> str:
    if name == "model":
        d = metrics["model"]
        return f"model ({d.get('source') or d.get('path') or d.get('model')})"
    if name == "baseline":
        d = metrics["baseline"]
        return f"baseline ({d.get('source') or d.get('path') or d.get('model')}; {d.get('role', 'given')})"
    return name


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def write_report(path: Path, metrics: dict) -> None:
    systems = metrics["systems"]
    names = list(systems)
    ref = metrics["comparison"]["reference"]
    comp = metrics["comparison"]["systems"]
    d = metrics["data"]
    lines = ["# cmalign eval report", ""]
    lines += [f"- **model**: {_system_title('model', metrics)}"]
    if metrics["baseline"]:
        lines += [f"- **baseline**: {_system_title('baseline', metrics)}"]
    else:
        lines += [f"- **baseline**: none ({metrics['baseline_note']})"]
    for name, fix in metrics["posthoc"].items():
        lines += [f"- **{name}**: {fix['description']} (fitted on the fit set)"]
    lines += [
        f"- **evaluation data**: {d['eval']} — {d['images']} images, {d['captions']} captions"
        + (f", {len(d['classes'])} classes" if d.get("classes") else ", no class labels"),
        f"- **fit data** (caption decoder, post-hoc fits): {d['fit']} — {d['fit_images']} images, "
        f"{d['fit_captions']} captions",
        f"- **class-prompt templates**: {', '.join(repr(t) for t in d['templates'])}",
        f"- **seed** {metrics['settings']['seed']}; caption tokenizer: {metrics['settings']['caption_tokenizer']}",
        f"- written {metrics['created']} by cmalign {metrics['cmalign_version']} in {metrics['seconds']:.0f} s",
        "",
    ]
    for note in metrics["notes"]:
        lines.append(f"> note: {note}")
    for task, why in metrics["skipped"].items():
        lines.append(f"> skipped **{task}**: {why}")
    if metrics["notes"] or metrics["skipped"]:
        lines.append("")

    lines += ["## Summary", ""]
    lines += markdown_table(["figure"] + names, [[label] + cells for label, cells in summary_rows(metrics)])
    lines.append("")
    if comp:
        lines += [f"Changes against **{ref}**:", ""]
        header = ["system"] + [f"{m} gap reduction" for m in ("raw", "centroid", "mmd2")] + \
                 ["Δ R@1 i→t", "Δ zero-shot", "Δ KMeans ARI", "Δ CIDEr-D"]
        rows = []
        for name, c in comp.items():
            red = c.get("gap_reduction", {})
            delta = c["delta"]
            rows.append([name] + [f"{100 * red[m]:+.1f} %" if m in red else "—" for m in ("raw", "centroid", "mmd2")]
                        + [_fmt(delta.get(k)) if k in delta else "—" for k in
                           ("retrieval.i2t_R@1", "zeroshot.top1", "clustering.kmeans_ari", "caption.cider_d")])
        lines += markdown_table(header, rows)
        lines += ["", "(gap reduction = 1 − gap(system) / gap(reference); positive = smaller gap)", ""]

    for task, title in TASK_TITLES.items():
        keys = []
        for s in systems.values():
            for key, value in s.get(task, {}).items():
                if key not in keys and not isinstance(value, (list, dict)):
                    keys.append(key)
        if not keys:
            continue
        lines += [f"## {title}", ""]
        lines += markdown_table(["figure"] + names,
                        [[key] + [_fmt(s.get(task, {}).get(key)) if task in s else "—" for s in systems.values()]
                         for key in keys])
        lines.append("")
        if task == "caption":
            lines += _caption_notes(systems)
    if metrics.get("figures"):
        lines += ["## Figures", ""]
        lines += [f"![{f}]({f})" for f in metrics["figures"]]
        lines.append("")
    lines += ["## Definitions", ""]
    lines += [f"- `{k}`: {v}" for k, v in metrics["definitions"].items()]
    lines += ["", "## Timings (seconds)", ""]
    lines += [f"- {k}: {v}" for k, v in metrics["timings_seconds"].items()]
    with atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")


def _caption_notes(systems: dict) -> list[str]:
    lines = []
    for name, s in systems.items():
        cap = s.get("caption")
        if not cap:
            continue
        lines += [f"Examples ({name}; decoder trained {cap['train_seconds']} s, CIDEr scoring "
                  f"{cap['cider_seconds']} s):", ""]
        for ex in cap["examples"][:3]:
            lines.append(f"- from image: *{ex['from_image']}* · from text: *{ex['from_text']}* · "
                         f"references: {'; '.join(ex['references'])}")
        lines.append("")
    return lines
