"""`cmalign eval`: the aligned space measured on the protocols of DESIGN.md §3, in a report a person reads.

    config.py             what eval measures, on which data, with which settings
    datasets.py           the evaluation set and the fit set (for the caption decoder and the post-hoc fits)
    encoders.py           what eval embeds with: a run or model (torch) or an export (onnxruntime)
    system_embeddings.py  every embedding the tasks need from one system, made once
    posthoc.py            the post-hoc fixes fine-tuning must beat (centring, Liang's shift, Procrustes, GR-CLIP)
    evaluators.py         one evaluator object per task (gap, retrieval, mixed, clustering, zero-shot, caption)
    runner.py             evaluate(): systems × evaluators → metrics.json, report.md, figures
    report.py, figures.py what a person reads
    captioning/           the caption-prefix protocol: decoders, tokenisation, CIDEr-D

Public names load on first use, so the metric and post-hoc modules import alone."""

from cmalign._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "config": ("EvalConfig",),
    "runner": ("EvalResult", "evaluate"),
})
