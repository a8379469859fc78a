"""report.md — the tables a person reads — and the short summary printed to the terminal."""

from __future__ import annotations

from pathlib import Path

from cmalign.artifacts.atomic import atomic_write

# (task, key, label, higher is better) rows of the summary and the per-task tables
SUMMARY_ROWS = (
    ("gap", "raw", "raw gap", False),
    ("gap", "centroid", "centroid gap (L2M)", False),
    ("gap", "l2i_first", "L2I (first caption)", False),
    ("gap", "l2i_mean_caption", "L2I (mean caption)", False),
    ("gap", "mmd2", "MMD² (distribution)", False),
    ("gap", "rmg", "RMG", False),
    ("retrieval", "i2t_R@1", "R@1 image→text", True),
    ("retrieval", "t2i_R@1", "R@1 text→image", True),
    ("mixed", "text_query_image_share@{k}", "text query: images@{k}", True),
    ("mixed", "image_query_text_share@{k}", "image query: texts@{k}", True),
    ("mixcorpus", "ndcg@{k}_p=0.5", "mixed corpus NDCG@{k} (p = 0.5)", True),
    ("mixcorpus", "ndcg_range", "mixed corpus NDCG range over p", False),
    ("clustering", "kmeans_ari", "KMeans ARI (joint)", True),
    ("clustering", "hdbscan_ari", "HDBSCAN ARI (joint)", True),
    ("zeroshot", "top1", "zero-shot top-1", True),
    ("caption", "cider_d", "CIDEr-D from images", True),
    ("caption", "rouge_l", "ROUGE-L from images", True),
)
REDUCTION_MEASURES = ("raw", "centroid", "l2i_first", "l2i_mean_caption", "mmd2")  # the comparison table's columns

TASK_TITLES = {
    "gap": "Gap decomposition",
    "retrieval": "Cross-modal retrieval",
    "mixed": "Mixed-modality retrieval (one joint index of images and captions)",
    "mixcorpus": "Mixed-modality corpus (documents as image or caption with probability p; MixBench)",
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


def _interval(ci) -> str:
    return "" if not ci else f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def cell(metrics: dict, system: str, task: str, key: str, with_ci: bool = True) -> str:
    """One figure of one system, with its 95 % interval when metrics.json has one."""
    s = metrics["systems"][system]
    if task not in s:
        return "—"
    text = _fmt(s[task].get(key))
    if with_ci and key in s[task]:
        text += _interval(metrics.get("ci", {}).get(system, {}).get(task, {}).get(key))
    return text


def summary_rows(metrics: dict, with_ci: bool = False) -> list[tuple[str, list[str]]]:
    """(label, one cell per system) for the headline figures present; ``with_ci`` adds the [low, high] intervals."""
    systems = metrics["systems"]
    k = metrics["settings"]["k"]
    rows = []
    for task, key, label, _ in SUMMARY_ROWS:
        key, label = key.format(k=k), label.format(k=k)
        if any(task in s and key in s[task] for s in systems.values()):
            rows.append((label, [cell(metrics, name, task, key, with_ci) for name in systems]))
    return rows


def _pct_interval(ci) -> str:
    return "" if not ci else f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def _reference_note(metrics: dict, ref: str) -> str:
    if ref == "baseline" and (metrics.get("baseline") or {}).get("role") == "the run's starting model":
        return " (the run's starting model: the original model, the paper's reference)"
    if ref == "baseline":
        return " (the given baseline)"
    return " (the model itself: no baseline)"


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


AGAINST_FIXES = (("retrieval.i2t_R@1", "Δ R@1 i→t"), ("retrieval.t2i_R@1", "Δ R@1 t→i"),
                 ("zeroshot.top1", "Δ zero-shot"), ("clustering.kmeans_ari", "Δ KMeans ARI"),
                 ("caption.cider_d", "Δ CIDEr-D"), ("mixed.text_query_image_share@10", "Δ text query: images@10"))


def _side(ci) -> str:
    """Where a paired interval of a higher-is-better change lies: above 0, below 0, or across it."""
    return "better" if ci[0] > 0 else "worse" if ci[1] < 0 else "tied"


def against_fix_verdicts(metrics: dict) -> dict[str, dict[str, list[str]]]:
    """Per fix, the figures of :data:`AGAINST_FIXES` (all higher-is-better) where the model is resolved better,
    resolved worse, or not resolved (its paired interval includes 0): {fix: {"better"|"worse"|"tied": [labels]}}."""
    out = {}
    for fix, c in (metrics["comparison"].get("model_against_fixes") or {}).items():
        verdict: dict[str, list[str]] = {"better": [], "worse": [], "tied": []}
        for key, label in AGAINST_FIXES:
            ci = c.get("ci", {}).get(f"delta.{key}")
            if ci is not None:
                verdict[_side(ci)].append(label.removeprefix("Δ "))
        out[fix] = verdict
    return out


def _against_fixes_section(metrics: dict) -> list[str]:
    """model − fix for each post-hoc fix; a change whose paired interval excludes 0 is bold (resolved)."""
    against = metrics["comparison"].get("model_against_fixes")
    if not against:
        return []
    shown = [(k, label) for k, label in AGAINST_FIXES if any(k in c["delta"] for c in against.values())]
    rows = []
    for fix, c in against.items():
        row = [fix]
        for key, _ in shown:
            if key not in c["delta"]:
                row.append("—")
                continue
            ci = c.get("ci", {}).get(f"delta.{key}")
            text = _fmt(c["delta"][key]) + _interval(ci)
            row.append(f"**{text}**" if ci and _side(ci) != "tied" else text)
        rows.append(row)
    return (["The model against each post-hoc fix (model − fix; **bold**: the paired interval excludes 0, so the "
             "difference is resolved on this evaluation set):", ""]
            + markdown_table(["fix"] + [label for _, label in shown], rows) + [""])


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

    boot = metrics.get("bootstrap") or {}
    has_ci = bool(metrics.get("ci"))
    lines += ["## Summary", ""]
    if has_ci:
        lines += [f"Each figure with its {100 * boot['level']:.0f} % bootstrap interval [low, high] over the "
                  f"evaluation images ({boot['repetitions']} resamples; see [Confidence intervals]"
                  "(#confidence-intervals)).", ""]
    lines += markdown_table(["figure"] + names,
                            [[label] + cells for label, cells in summary_rows(metrics, with_ci=True)])
    lines.append("")
    if comp:
        lines += [f"Changes against **{ref}**{_reference_note(metrics, ref)}:", ""]
        labels = {"raw": "raw", "centroid": "centroid (L2M)", "l2i_first": "L2I first", "l2i_mean_caption":
                  "L2I mean caption", "mmd2": "MMD²"}
        shown = [m for m in REDUCTION_MEASURES if any(m in c.get("gap_reduction", {}) for c in comp.values())]
        header = ["system"] + [f"{labels[m]} gap reduction" for m in shown] + \
                 ["Δ R@1 i→t", "Δ zero-shot", "Δ KMeans ARI", "Δ CIDEr-D"]
        rows = []
        for name, c in comp.items():
            red = c.get("gap_reduction", {})
            delta = c["delta"]
            ci = c.get("ci", {})
            rows.append([name] + [f"{100 * red[m]:+.1f} %{_pct_interval(ci.get(f'gap_reduction.{m}'))}"
                                  if m in red else "—" for m in shown]
                        + [_fmt(delta.get(k)) + _interval(ci.get(f"delta.{k}")) if k in delta else "—" for k in
                           ("retrieval.i2t_R@1", "zeroshot.top1", "clustering.kmeans_ari", "caption.cider_d")])
        lines += markdown_table(header, rows)
        lines += ["", "(gap reduction = 1 − gap(system) / gap(reference); positive = smaller gap"
                  + ("; [low, high]: paired bootstrap intervals, both systems on the same image resamples)"
                     if has_ci else ")"), ""]

    lines += _against_fixes_section(metrics)

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
                                [[_row_label(task, key)] + [cell(metrics, name, task, key) for name in names]
                                 for key in keys])
        lines.append("")
        if task == "caption":
            lines += _caption_notes(systems)
    if metrics.get("figures"):
        lines += ["## Figures", ""]
        lines += [f"![{f}]({f})" for f in metrics["figures"]]
        lines.append("")
    if has_ci:
        lines += _ci_section(boot)
    lines += ["## Definitions", ""]
    lines += [f"- `{k}`: {v}" for k, v in metrics["definitions"].items()]
    lines += ["", "## Timings (seconds)", ""]
    lines += [f"- {k}: {v}" for k, v in metrics["timings_seconds"].items()]
    with atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")


def _row_label(task: str, key: str) -> str:
    if task == "gap":
        from cmalign.metrics.gap import LITERATURE_NAMES

        if key in LITERATURE_NAMES:
            return f"{key}: {LITERATURE_NAMES[key]}"
    return key


def _ci_section(boot: dict) -> list[str]:
    lines = ["## Confidence intervals", "",
             f"- {boot['method']}: {boot['repetitions']} resamples, seed {boot['seed']}, "
             f"{100 * boot['level']:.0f} % percentile intervals; {', '.join(boot['slow'])} use "
             f"{boot['repetitions_slow']} (each resample costs O(n²) or d×d eigenvalues), so their bounds carry "
             "a larger Monte-Carlo error.",
             "- Every system is resampled with the same images, so differences get paired intervals.",
             "- What is resampled, and what is held fixed:", ""]
    lines += [f"  - **{task}**: {how}" for task, how in boot["resampling"].items()]
    if boot.get("basic"):
        lines += ["", f"- {', '.join(boot['basic'])}: basic (reverse-percentile) intervals, for "
                  f"{boot.get('basic_why', 'a resampling bias')}."]
    if boot.get("without_ci"):
        by_reason: dict[str, list[str]] = {}
        for key, why in boot["without_ci"].items():
            by_reason.setdefault(why, []).append(f"`{key}`")
        lines += ["", "- Figures without an interval:"]
        lines += [f"  - {why}: {', '.join(keys)}" for why, keys in by_reason.items()]
    return lines + [""]


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
