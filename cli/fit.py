"""`cmalign fit`: builds a FitConfig from a TOML file and flags, then calls :func:`cmalign.train.loop.fit`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cmalign.data.options import FORMATS
from cmalign.train.config import FitConfig, load_config, parse_set

HELP = (
    "Fine-tune an open_clip model with TPC-CMA: contrastive loss + centroid/distribution alignment, "
    "three-phase curriculum, gradient-aware scheduler.\n\n"
    "With no options it fine-tunes the embedded default (cmalign-tiny, pretrained once on the generated "
    "image–caption set and cached) on that set, and prints the gap before and after.\n\n"
    "Settings come from the defaults, then --config FILE (TOML), then the flags, then --set KEY=VALUE; "
    "the resolved config is saved as RUN/config.toml. The fitted model loads in plain open_clip: "
    "create_model_and_transforms('local-dir:RUN/model')."
)

_D = FitConfig()  # defaults shown in the help come from the config itself


def _d(value) -> str:
    return f"(default: {value})"


def fit_command(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file (keys as in RUN/config.toml).",
                                                   rich_help_panel="Config")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override any config key, e.g. --set "
                                                      "loss.mmd_bandwidths=0.5,1,2 (repeatable).",
                                                      rich_help_panel="Config")] = None,
    # data
    data: Annotated[str | None, typer.Option("--data", help="Training data: CSV/TSV (filepath,title[,label]), "
                    "JSON lines, COCO captions JSON, a folder of foo.jpg+foo.txt, or WebDataset .tar shards "
                    "(a .tar, a folder of them, or a {0000..0009} pattern). (default: the generated set)",
                    rich_help_panel="Data")] = None,
    val: Annotated[str | None, typer.Option("--val", help="Validation data, same formats. (default: the generated "
                   f"val split, or {_D.data.val_fraction:.0%} of --data held out by image)",
                   rich_help_panel="Data")] = None,
    data_format: Annotated[str | None, typer.Option("--format", help=f"{'|'.join(FORMATS)} "
                           f"{_d(_D.data.format)}", rich_help_panel="Data")] = None,
    image_root: Annotated[str | None, typer.Option(help="Directory that relative image paths are under "
                          "(default: the data file's directory)", rich_help_panel="Data")] = None,
    csv_separator: Annotated[str | None, typer.Option(help="CSV separator (default: tab for .tsv; sniffed "
                             "between tab and comma for .csv)", rich_help_panel="Data")] = None,
    image_column: Annotated[str | None, typer.Option(help=f"Image path column/field {_d(_D.data.image_column)}",
                                                        rich_help_panel="Data")] = None,
    caption_column: Annotated[str | None, typer.Option(help="Caption column/field "
                              f"{_d(_D.data.caption_column)}", rich_help_panel="Data")] = None,
    label_column: Annotated[str | None, typer.Option(help="Optional class-name column/field, used for zero-shot "
                            f"and clustering {_d(_D.data.label_column)}", rich_help_panel="Data")] = None,
    on_bad_sample: Annotated[str | None, typer.Option(help="skip: skip and list unreadable images/empty captions "
                             "in RUN/bad_samples.jsonl; fail: stop at the first one "
                             f"{_d(_D.data.on_bad_sample)}", rich_help_panel="Data")] = None,
    workers: Annotated[int | None, typer.Option(help="Data loader worker processes; -1 = auto "
                       f"{_d(_D.data.num_workers)}", rich_help_panel="Data")] = None,
    # model
    model: Annotated[str | None, typer.Option("--model", "-m", help="open_clip model name (ViT-B-32, ...), "
                     f"local-dir:PATH or hf-hub:ORG/REPO {_d(_D.model.name)}", rich_help_panel="Model")] = None,
    pretrained: Annotated[str | None, typer.Option(help="open_clip pretrained tag, or a checkpoint file "
                          "(.safetensors, or a torch state dict loaded with weights_only=True); 'random' for no "
                          "weights. (default: cmalign-base for cmalign-tiny, else random with a warning)",
                          rich_help_panel="Model")] = None,
    trainable: Annotated[str | None, typer.Option(help="What trains: all | image | text | projections | last:N "
                         f"(last N blocks of each tower) {_d(_D.model.trainable)}", rich_help_panel="Model")] = None,
    grad_checkpointing: Annotated[bool | None, typer.Option("--grad-checkpointing/--no-grad-checkpointing",
                                  help="Trade compute for activation memory (default: off)",
                                  rich_help_panel="Model")] = None,
    # method
    alpha_target: Annotated[float | None, typer.Option(help="Final alignment weight α_target: higher closes "
                            "more of the gap at more zero-shot cost (paper: 0.05 conservative, 0.5 strong) "
                            f"{_d(_D.alpha_target)}", rich_help_panel="Method")] = None,
    distribution: Annotated[str | None, typer.Option(help="Distribution term: mmd (unbiased multi-bandwidth "
                            f"RBF MMD²) | coral | bures {_d(_D.loss.distribution)}",
                            rich_help_panel="Method")] = None,
    lambda_centroid: Annotated[float | None, typer.Option(help="Weight λ_c of the squared centroid distance "
                               f"{_d(_D.loss.lambda_centroid)}", rich_help_panel="Method")] = None,
    lambda_distribution: Annotated[float | None, typer.Option(help="Weight λ_d of the distribution term "
                                   f"{_d(_D.loss.lambda_distribution)}", rich_help_panel="Method")] = None,
    lambda_paired: Annotated[float | None, typer.Option(help="Weight λ_p of the paired residual (centred pairs' "
                             "squared distance; not in the paper, it closes what the centroid and distribution "
                             f"terms cannot reach; 0 = the paper's loss) {_d(_D.loss.lambda_paired)}",
                             rich_help_panel="Method")] = None,
    text_share: Annotated[float | None, typer.Option(help="Share of the alignment terms' gradient that reaches the "
                          "text tower, 0–1 (the image tower gets all of it; 1 = both alike, the paper; lower keeps "
                          f"text→image retrieval) {_d(_D.loss.text_share)}", rich_help_panel="Method")] = None,
    warmup_fraction: Annotated[float | None, typer.Option(help="Phase 1 (α=0) as a fraction of the steps "
                               f"{_d(_D.curriculum.warmup_fraction)}", rich_help_panel="Method")] = None,
    intro_fraction: Annotated[float | None, typer.Option(help="Phase 2 (α ramps to intro ratio × α_target) as "
                              f"a fraction of the steps {_d(_D.curriculum.intro_fraction)}",
                              rich_help_panel="Method")] = None,
    ramp: Annotated[str | None, typer.Option(help=f"Ramp shape: linear | cosine | step {_d(_D.curriculum.ramp)}",
                                                rich_help_panel="Method")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Gradient-aware scheduler on conflicting gradients: "
                         "block (lower the learning rate of conflicting parameter blocks, the paper's) | "
                         "project (PCGrad at the embeddings) | lr (scale the step) | alpha (scale α) | off "
                         f"{_d(_D.scheduler.mode)}", rich_help_panel="Method")] = None,
    max_ratio: Annotated[float | None, typer.Option(help="Embedding-space modes: cap of α·|∇CMA| / |∇clip| at the "
                         "embeddings (block: --set scheduler.block_max_ratio=) "
                         f"{_d(_D.scheduler.max_ratio)}", rich_help_panel="Method")] = None,
    # optimisation
    steps: Annotated[int | None, typer.Option(help=f"Optimizer steps {_d(_D.train.steps)}",
                                                 rich_help_panel="Training")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Pairs per process per micro-step "
                          f"{_d(_D.train.batch_size)}", rich_help_panel="Training")] = None,
    accum_steps: Annotated[int | None, typer.Option(help="Gradient accumulation micro-steps per step "
                           f"{_d(_D.optim.accum_steps)}", rich_help_panel="Training")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (AdamW) "
                                             "(default: 2e-4 for cmalign-tiny, 1e-5 for other models)",
                                                rich_help_panel="Training")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay (not on norms, biases, "
                            f"embeddings, logit scale) {_d(_D.optim.weight_decay)}",
                            rich_help_panel="Training")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear lr warm-up steps, then cosine decay "
                            f"{_d(_D.optim.warmup_steps)}", rich_help_panel="Training")] = None,
    grad_clip: Annotated[float | None, typer.Option(help="Max global gradient norm, 0 = off "
                         f"{_d(_D.optim.grad_clip)}", rich_help_panel="Training")] = None,
    precision: Annotated[str | None, typer.Option(help="auto | fp32 | amp (fp16) | amp_bf16; auto = bf16 AMP on "
                         f"CUDA, fp32 on CPU {_d(_D.train.precision)}", rich_help_panel="Training")] = None,
    device: Annotated[str | None, typer.Option(help=f"auto | cpu | cuda | cuda:N {_d(_D.train.device)}",
                                                  rich_help_panel="Training")] = None,
    seed: Annotated[int | None, typer.Option(help=f"Random seed {_d(_D.train.seed)}",
                                                rich_help_panel="Training")] = None,
    # run directory
    out: Annotated[str | None, typer.Option("--out", "-o", help="Run directory "
                                            "(default: a new runs/<model>-a<alpha>[-N])",
                                               rich_help_panel="Run")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint, with "
                      "its saved config.toml (flags given here still override).", rich_help_panel="Run")] = False,
    checkpoint_every: Annotated[int | None, typer.Option(help="Write a resume checkpoint every N steps, 0 = never "
                                f"{_d(_D.train.checkpoint_every)}", rich_help_panel="Run")] = None,
    guard_every: Annotated[int | None, typer.Option(help="Guard evaluation (R@1, zero-shot, gaps) on the val split "
                           f"every N steps, 0 = only before/after {_d(_D.train.guard_every)}",
                           rich_help_panel="Run")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary table.",
                                        rich_help_panel="Run")] = False,
):
    from rich.console import Console

    from cmalign.train.loop import fit

    console = Console(stderr=True)
    flags = {
        "data.train": data, "data.val": val, "data.format": data_format, "data.image_root": image_root,
        "data.csv_separator": csv_separator, "data.image_column": image_column,
        "data.caption_column": caption_column, "data.label_column": label_column,
        "data.on_bad_sample": on_bad_sample, "data.num_workers": workers,
        "model.name": model, "model.pretrained": pretrained, "model.trainable": trainable,
        "model.grad_checkpointing": grad_checkpointing,
        "alpha_target": alpha_target, "loss.distribution": distribution, "loss.lambda_centroid": lambda_centroid,
        "loss.lambda_distribution": lambda_distribution, "loss.lambda_paired": lambda_paired,
        "loss.text_share": text_share,
        "curriculum.warmup_fraction": warmup_fraction,
        "curriculum.intro_fraction": intro_fraction, "curriculum.ramp": ramp, "scheduler.mode": scheduler,
        "scheduler.max_ratio": max_ratio, "train.steps": steps, "train.batch_size": batch_size,
        "optim.accum_steps": accum_steps, "optim.lr": lr, "optim.weight_decay": weight_decay,
        "optim.warmup_steps": warmup_steps, "optim.grad_clip": grad_clip, "train.precision": precision,
        "train.device": device, "train.seed": seed, "train.out": out,
        "train.checkpoint_every": checkpoint_every, "train.guard_every": guard_every,
    }
    try:
        flags.update(parse_set(set_ or []))
    except ValueError as e:
        raise typer.BadParameter(str(e).removeprefix("--set: "), param_hint="--set") from None
    if resume:
        if out is None:
            raise typer.BadParameter("--resume needs --out RUN (the run directory to continue)", param_hint="--resume")
        saved = Path(out) / "config.toml"
        if not saved.is_file():
            raise typer.BadParameter(f"no run to resume: {saved} does not exist", param_hint="--out")
        config = config or saved
    cfg = load_config(config, flags)
    result = fit(cfg, resume=resume, console=console, show_progress=not quiet)
    if not quiet:
        print_summary(console, result)


_ROWS = [
    ("raw", "raw gap G_R (paired)", "lower"), ("centroid", "centroid gap G_C", "lower"),
    ("paired_residual", "paired residual G_P", "lower"), ("mmd2", "distribution gap MMD²", "lower"),
    ("bures", "Bures distance", "lower"), ("coral", "CORAL", "lower"), ("rmg", "relative modality gap", "lower"),
    ("r1_i2t", "image→text R@1", "higher"), ("r1_t2i", "text→image R@1", "higher"),
    ("zeroshot_top1", "zero-shot top-1", "higher"),
]


def print_summary(console, result) -> None:
    from rich.table import Table

    table = Table(title=f"validation ({result.after.get('n_images', '?')} images): before → after {result.steps} steps")
    for col in ("measure", "before", "after", "change"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    for key, label, better in _ROWS:
        b, a = result.before.get(key), result.after.get(key)
        if b is None or a is None:
            continue
        change = f"{(a - b) / abs(b):+.1%}" if b else "n/a"
        good = (a < b) if better == "lower" else (a > b)
        table.add_row(label, f"{b:.4g}", f"{a:.4g}", f"[{'green' if good else 'red'}]{change}[/]")
    console.print(table)
    console.print(f"model: local-dir:{result.model_dir}   ({result.seconds:.0f} s"
                  + (f", {result.skipped_samples} samples skipped" if result.skipped_samples else "") + ")")
    w = result.warmup
    if w.get("reason") == "warmup_max_fraction":
        console.print(f"[yellow]note:[/] the contrastive loss was still falling when the warm-up reached its maximum "
                      f"(step {w['ended_at_step']}), so alignment ran only in the last steps and closed little of "
                      "the gap. Train longer (--steps) to align on this data (docs/method.md#curriculum).")
