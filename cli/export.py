"""`cmalign export`: builds an ExportConfig and calls :func:`cmalign.export.onnx_export.export_model`."""

from __future__ import annotations

from typing import Annotated

import typer

HELP = (
    "Export the image and text encoders as ONNX graphs that output L2-normalised embeddings, with the "
    "preprocessing config, the tokenizer and a manifest, for the torch-free runtime "
    "(cmalign.export.load_export) and `cmalign embed`.\n\n"
    "SOURCE is a `cmalign fit` run directory or an open_clip local-dir model; or give --model/--pretrained "
    "to export a plain open_clip model (an unaligned baseline). Every graph passes onnx.checker and must "
    "match torch eager on generated images and captions at batch 1, 3 and 32 (min cosine 0.99999 for fp32, "
    "0.999 fp16, 0.98 int8; int8 may lose at most 0.01 R@1) or nothing is written."
)


def export_command(
    source: Annotated[str | None, typer.Argument(help="A `cmalign fit` run directory or an open_clip local-dir "
                                                      "model directory.", show_default=False)] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Export directory to write "
                                            "(default: exports/<source name>).")] = None,
    model: Annotated[str | None, typer.Option(help="open_clip model name, instead of SOURCE (e.g. ViT-B-32).")] = None,
    pretrained: Annotated[str | None, typer.Option(help="open_clip tag or checkpoint file, with --model; "
                                                   "cmalign-base: cmalign-tiny's embedded base; random: no "
                                                   "weights.")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write fp16 graphs (float32 inputs/outputs).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Also write int8 graphs (dynamic quantisation).")] = False,
    int8_per_tensor: Annotated[bool, typer.Option("--int8-per-tensor", help="Quantise int8 weights per tensor "
                                                  "instead of per output channel.")] = False,
    int8_full_range: Annotated[bool, typer.Option("--int8-full-range", help="8-bit instead of 7-bit int8 weights: "
                                                  "faster on CPUs without AVX-512 VNNI but can saturate there "
                                                  "(ViT-B-32: min cosine 0.980 vs 0.999).")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset: 18-25 with dynamo (<= 22 with --int8), 14-23 with "
                                            "--exporter legacy.")] = 20,
    exporter: Annotated[str, typer.Option(help="dynamo (torch.export) or legacy (TorchScript).")] = "dynamo",
    retrieval_images: Annotated[int, typer.Option(help="Generated validation images for the R@1 check of each "
                                                  "variant (0 skips it; int8's bound is enforced from 500).")] = 1000,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing export directory.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only print errors.")] = False,
):
    from pathlib import Path

    from rich.console import Console
    from rich.markup import escape

    from cmalign.export.onnx_export import ExportConfig, export_model

    console = Console(stderr=quiet)
    if out is None:
        name = Path(source).name if source else model.replace("/", "_") if model else "model"
        out = str(Path("exports") / name)
    cfg = ExportConfig(source=source, model=model, pretrained=pretrained, out=out, fp16=fp16, int8=int8,
                       int8_per_channel=not int8_per_tensor,
                       int8_reduce_range=not int8_full_range, opset=opset, exporter=exporter,
                       retrieval_images=retrieval_images, overwrite=overwrite)
    with console.status("exporting", spinner="dots") as status:
        result = export_model(cfg, log=(lambda msg: None) if quiet else
                              (lambda msg: (status.update(escape(msg)), console.log(escape(msg)))))
    if not quiet:
        print_summary(console, result)


def print_summary(console, result) -> None:
    from rich.markup import escape
    from rich.table import Table

    m = result.manifest
    table = Table(title=f"{escape(str(result.out))}  (dim {m['embed_dim']}, opset {m['opset']}, "
                        f"fingerprint {m['fingerprint']})")
    for col in ("graph", "size", "min cos @1/3/32", "R@1 i→t / t→i"):
        table.add_column(col, justify="left" if col == "graph" else "right")
    for variant, towers in m["graphs"].items():
        r = m["retrieval"].get(variant)
        for tower, g in towers.items():
            p = g["parity"]
            table.add_row(g["file"], f"{g['bytes'] / 1e6:.1f} MB",
                          " / ".join(f"{p[f'batch_{b}']:.6f}" for b in m["parity"]["batch_sizes"]),
                          f"{r['r1_i2t']:.3f} / {r['r1_t2i']:.3f}" if r and tower == "image" else "")
    console.print(table)
    pipe = m["parity"]["pipeline"]
    console.print(f"torch-free preprocessing max |Δ| {pipe['preprocess_max_abs_diff']:.1e}, tokens equal to "
                  f"open_clip: {pipe['tokens_equal']}   ({result.seconds:.0f} s)")
