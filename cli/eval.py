"""`cmalign eval`: builds an EvalConfig and calls :func:`cmalign.evaluation.evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cmalign.data.options import FORMATS, ReaderOptions
from cmalign.errors import ConfigError
from cmalign.evaluation.captioning.config import DecoderConfig
from cmalign.evaluation.config import TASKS, EvalConfig

HELP = (
    "Measure the aligned space: gap decomposition, cross-modal retrieval, mixed-modality search, joint "
    "clustering (KMeans and HDBSCAN ARI/NMI), zero-shot accuracy and caption-prefix quality (CIDEr-D, BLEU-4), "
    "optionally beside the post-hoc fixes (mean-centring, Liang's shift, Procrustes).\n\n"
    "SOURCE is a `cmalign fit` run (evaluated in torch, against the model it started from), an export directory "
    "(evaluated through onnxruntime), an adapter directory (its derived export, against the adapter's base export), "
    "or an open_clip model directory; or give --model/--pretrained. Writes "
    "OUT/metrics.json, OUT/report.md and PNG figures, and prints a summary. With no --data it uses the generated "
    "validation split, and fits the caption decoder and post-hoc fixes on the generated train split."
)

_D = EvalConfig(model="-")
_R = ReaderOptions()
_C = DecoderConfig()


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(s.strip() for s in value.split(",") if s.strip()) if value else ()


def eval_command(
    source: Annotated[str | None, typer.Argument(help="A run, export, adapter or open_clip model directory.",
                                                 show_default=False)] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="open_clip model name instead of SOURCE "
                     "(cmalign-tiny uses the embedded base unless --pretrained says otherwise).")] = None,
    pretrained: Annotated[str | None, typer.Option(help="open_clip tag or checkpoint file, with --model; "
                          "'random' for no weights.")] = None,
    data: Annotated[str | None, typer.Option(help="Evaluation data (the formats `fit` reads). "
                    "(default: the generated validation split)", rich_help_panel="Data")] = None,
    fit_data: Annotated[str | None, typer.Option(help="Training pairs for the caption decoder and the post-hoc "
                        "fits. (default: the generated train split without --data, else a share of --data's "
                        "images, held out from evaluation)", rich_help_panel="Data")] = None,
    tasks: Annotated[str, typer.Option(help="Comma list of " + ", ".join(TASKS) + ".")] = ",".join(TASKS),
    baseline: Annotated[str, typer.Option(help="auto: a run's starting model, if on this machine; base: the same, "
                        "required; none; or a run/export/model directory to compare against.")] = _D.baseline,
    posthoc: Annotated[str, typer.Option(help="Post-hoc fixes to evaluate beside the model: all, none, or a comma "
                       "list of centring, liang, procrustes, grclip.")] = "none",
    posthoc_on: Annotated[str, typer.Option(help="Whose embeddings the fixes apply to: auto (the baseline if there "
                          "is one, else the model), model or baseline.")] = _D.posthoc_on,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Report directory. (default: reports/<source "
                   "name>)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing report directory.")] = False,
    max_images: Annotated[int | None, typer.Option(help="Evaluate at most this many images (all their captions). "
                          "(default: all)")] = None,
    fit_images: Annotated[int, typer.Option(help="Fit-set images (all their captions).")] = _D.fit_images,
    templates: Annotated[Path | None, typer.Option(help="Class-prompt templates, one per line with {} for the "
                         "class name. (default: the data set's own, or CLIP-style ones)")] = None,
    k: Annotated[int, typer.Option("-k", help="Top-k of the mixed-modality figures.")] = _D.k,
    decoder_epochs: Annotated[int, typer.Option(help="Caption decoder training epochs.",
                              rich_help_panel="Caption decoder")] = _C.epochs,
    beam: Annotated[int, typer.Option(help="Beam width of caption decoding (1 = greedy).",
                    rich_help_panel="Caption decoder")] = _C.beam,
    caption_lm: Annotated[str | None, typer.Option(help="A local Hugging Face causal LM directory (e.g. a saved "
                          "GPT-2) to decode captions with, ClipCap-style, instead of the small decoder trained from "
                          "scratch. Needs the lm extra; nothing is downloaded.",
                          rich_help_panel="Caption decoder")] = None,
    figures: Annotated[bool, typer.Option("--figures/--no-figures", help="Write the PNG figures.")] = True,
    seed: Annotated[int, typer.Option(help="Seed of every random choice (subsets, KMeans, t-SNE, decoder).")] = 0,
    bootstrap: Annotated[int, typer.Option(help="Resamples of the evaluation images for each figure's 95 % "
                         "confidence interval (MMD², Bures, CORAL, W₂: at most 200); 0: none.")] = _D.bootstrap,
    device: Annotated[str, typer.Option(help="torch device for runs and models: auto, cpu, cuda.")] = _D.device,
    provider: Annotated[str, typer.Option(help="onnxruntime provider for exports: cpu or cuda.")] = _D.provider,
    variant: Annotated[str, typer.Option(help="Export graphs to use: fp32, fp16 or int8.")] = _D.variant,
    data_format: Annotated[str, typer.Option("--format", help="|".join(FORMATS),
                           rich_help_panel="Data")] = _R.format,
    image_root: Annotated[str | None, typer.Option(help="Directory relative image paths are under.",
                          rich_help_panel="Data")] = None,
    csv_separator: Annotated[str | None, typer.Option(help="CSV separator.", rich_help_panel="Data")] = None,
    image_column: Annotated[str, typer.Option(help="Image path column.", rich_help_panel="Data")] = _R.image_column,
    caption_column: Annotated[str, typer.Option(help="Caption column.", rich_help_panel="Data")] = _R.caption_column,
    label_column: Annotated[str, typer.Option(help="Class label column (clustering and zero-shot are skipped "
                            "without one).", rich_help_panel="Data")] = _R.label_column,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only print errors.")] = False,
):
    from rich.console import Console
    from rich.markup import escape

    from cmalign.evaluation import evaluate
    from cmalign.evaluation.posthoc import parse_posthoc

    console = Console(stderr=quiet)
    template_list = None
    if templates is not None:
        try:
            lines = templates.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--templates {templates}: cannot read it as UTF-8 text ({e})") from None
        template_list = tuple(t.strip() for t in lines if t.strip())
        bad = [t for t in template_list if "{}" not in t]
        if bad or not template_list:
            raise ConfigError(f"{templates}: every line must hold {{}} for the class name (first bad: "
                             f"{bad[0] if bad else 'the file is empty'!r})")
    cfg = EvalConfig(
        source=source, model=model, pretrained=pretrained, baseline=baseline, data=data, fit_data=fit_data,
        reader=ReaderOptions(format=data_format, image_root=image_root, csv_separator=csv_separator,
                             image_column=image_column, caption_column=caption_column, label_column=label_column),
        templates=template_list, tasks=_split(tasks), posthoc=parse_posthoc(posthoc), posthoc_on=posthoc_on,
        out=out, overwrite=overwrite, max_images=max_images, fit_images=fit_images, k=k,
        decoder=DecoderConfig(epochs=decoder_epochs, beam=beam, seed=seed, language_model=caption_lm),
        figures=figures, seed=seed, device=device, provider=provider, variant=variant, bootstrap=bootstrap)
    with console.status("evaluating", spinner="dots") as status:
        result = evaluate(cfg, log=(lambda msg: None) if quiet else
                          (lambda msg: (status.update(escape(msg)), console.log(escape(msg)))),
                          progress=lambda msg: status.update(escape(msg)))
    if not quiet:
        print_summary(console, result)


def print_summary(console, result) -> None:
    from rich.markup import escape
    from rich.table import Table

    from cmalign.evaluation.report import against_fix_verdicts, summary_rows

    m = result.metrics
    table = Table(title=f"{escape(str(result.out))}  ({m['data']['images']} images, {m['data']['captions']} "
                        f"captions, {result.seconds:.0f} s)")
    table.add_column("figure", no_wrap=True)
    fixed = {name.split("+")[0] for name in m["systems"] if "+" in name}
    for name in m["systems"]:
        table.add_column(escape("+" + name.split("+", 1)[1] if "+" in name else name), justify="right")
    if fixed:
        table.caption = f"+fix: a post-hoc fix applied to the {' and '.join(sorted(fixed))}'s embeddings"
    for label, cells in summary_rows(m):
        table.add_row(escape(label), *cells)
    console.print(table)
    for fix, verdict in against_fix_verdicts(m).items():
        parts = [f"{side} on {', '.join(verdict[side])}" for side in ("better", "worse") if verdict[side]]
        console.print(f"model against {escape(fix)} (paired 95 % intervals): "
                      f"{'; '.join(parts) or 'no resolved difference'}"
                      + (f"; tied on {', '.join(verdict['tied'])}" if verdict["tied"] and parts else ""),
                      highlight=False)
    for note in m["notes"]:
        console.print(f"note: {escape(note)}", highlight=False)
    for task, why in m["skipped"].items():
        console.print(f"skipped {task}: {escape(why)}", highlight=False)
    console.print(f"report: {escape(str(result.out / 'report.md'))}", highlight=False)
