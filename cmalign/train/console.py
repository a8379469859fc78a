"""What `fit` shows while it runs: the start line, and progress as a bar on a terminal or plain lines elsewhere.

The run's record is RUN/metrics.jsonl; this is for the person watching. Without a terminal (CI logs, nohup)
a bar cannot redraw, so a plain line is printed every 5 % of the steps instead. The guard figures are
measured only every ``guard_every`` steps, so they are shown with the step they were measured at.
"""

from __future__ import annotations


class FitProgress:
    """A rich progress bar (terminal) or plain ``step N/TOTAL ...`` lines; a context manager."""

    def __init__(self, console, total: int, start: int, enabled: bool, show_alpha: bool):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console, self.total, self.show_alpha = console, total, show_alpha
        self.bar = Progress(TextColumn("[bold]fit"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                            console=console, disable=not enabled, transient=False)
        self.task = self.bar.add_task("fit", total=total, completed=start, info="")
        self.plain_every = max(1, total // 20) if enabled and not console.is_terminal else 0
        self.guard_note = ""

    def __enter__(self) -> FitProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def guard(self, step: int, metrics: dict) -> None:
        """Guard figures measured after ``step``: shown from now on, with that step."""
        self.guard_note = f"  R@1 {metrics['r1_t2i']:.2f}  gap {metrics['raw']:.3f} @step {step}"

    def update(self, step: int, entry: dict) -> None:
        info = f"loss {entry['total']:.3f}"
        if self.show_alpha:
            info += f"  α {entry['alpha_eff']:.3f}  phase {entry['phase']}"
        info += self.guard_note
        self.bar.update(self.task, completed=step, info=info)
        if self.plain_every and (step % self.plain_every == 0 or step == self.total):
            self.console.print(f"step {step}/{self.total}  {info}", highlight=False)


def alpha_in_paper_units(alpha: float, logit_scale: float, scale_by_logit_scale: bool) -> float:
    """The paper's α for cmalign's: cmalign weighs the CMA term by α·s (s the logit scale) where the paper's
    L_clip + α·L_cma has α alone, so the paper's α is α·s (s ≈ 100 for a trained CLIP: cmalign's 0.5 is 50)."""
    return alpha * logit_scale if scale_by_logit_scale else alpha


def print_start(console, cfg, counts: dict, splits, guard, device, precision: str, env, workers: int,
                start_step: int, logit_scale: float) -> None:
    """One paragraph: what is trained, on what, how, and where the run directory is."""
    what = f"resuming at step {start_step}" if start_step else "starting"
    paper = alpha_in_paper_units(cfg.alpha_target, logit_scale, cfg.loss.scale_by_logit_scale)
    alpha = (f"α_target {cfg.alpha_target} (paper units {paper:.3g}: × logit scale {logit_scale:.3g})"
             if cfg.loss.scale_by_logit_scale and cfg.alpha_target else f"α_target {cfg.alpha_target}")
    if cfg.alpha_target and cfg.loss.text_share < 1:
        alpha += f", text tower's share of the alignment gradient {cfg.loss.text_share:g}"
    console.print(
        f"[bold]cmalign fit[/] {what}: model {cfg.model.name} "
        f"({counts['trainable'] / 1e6:.2f}M of {counts['total'] / 1e6:.2f}M parameters train, "
        f"trainable={cfg.model.trainable}), {alpha}, {cfg.train.steps} steps × batch "
        f"{cfg.train.batch_size}×{env.world_size}×{cfg.optim.accum_steps}, {device} {precision}, "
        f"{workers} data workers\n  train {len(splits.train)} pairs ({splits.description.get('train')}), "
        f"val {len(guard.images)} images / {len(guard.captions)} captions"
        + (f", {len(splits.skipped)} samples skipped (see bad_samples.jsonl)" if splits.skipped else "")
        + (f", {len(guard.dropped)} unreadable val images dropped" if guard.dropped else "")
        + f"\n  run directory: {cfg.train.out}")
