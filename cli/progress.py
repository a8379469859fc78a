"""One progress display for the commands whose library function reports ``progress(stage, done, total)``."""

from __future__ import annotations


def stage_progress(quiet: bool, console=None, label=lambda stage: stage):
    """(rich Progress, report callback): one bar per stage, created when the stage first reports."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console, disable=quiet)
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(label(stage), total=total)
        progress.update(tasks[stage], completed=done, total=total)

    return progress, report
