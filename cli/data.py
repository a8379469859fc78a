"""`cmalign data synth`: write the generated default data set to disk, to see (or reuse) its format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cmalign.cli.errors import reports_errors
from cmalign.data import synth

app = typer.Typer(help="Data set utilities.", no_args_is_help=True)


@app.command("synth", help="Write the generated default data set as PNG images + open_clip-style CSVs "
                           "(train.csv, val.csv, test.csv with columns filepath,title,label) and a manifest.")
@reports_errors
def synth_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (created).")],
    seed: Annotated[int, typer.Option(help="Generator seed; the same seed gives the same files.")] = 0,
    train_images: Annotated[int, typer.Option(help="Images in the train split.")] = synth.SPLITS["train"],
    val_images: Annotated[int, typer.Option(help="Images in the val split.")] = synth.SPLITS["val"],
    test_images: Annotated[int, typer.Option(help="Images in the test split.")] = synth.SPLITS["test"],
    captions_per_image: Annotated[int, typer.Option(help="Captions (CSV rows) per image.")] = synth.CAPTIONS_PER_IMAGE,
):
    from rich.progress import Progress

    sizes = {"train": train_images, "val": val_images, "test": test_images}
    with Progress(transient=True) as progress:
        tasks = {k: progress.add_task(f"writing {k}", total=v) for k, v in sizes.items()}
        written = synth.write_synth(out, seed=seed, sizes=sizes, captions_per_image=captions_per_image,
                                    progress=lambda split, done, n: progress.update(tasks[split], completed=done))
    for split, path in written.items():
        typer.echo(f"{split}: {sizes[split]} images, {sizes[split] * captions_per_image} rows -> {path}")
