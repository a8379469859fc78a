"""What a sweep is: the alphas, the shared fit and eval settings, and which of them make two sweeps the same."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from cmalign.cluster.connect import RayOptions


@dataclass
class SweepConfig:
    alphas: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1, 0.2, 0.5)
    out: str = "sweeps/default"
    data: str | None = None  # training data for every fit (None: the generated set); the decoder's fit data too
    val: str | None = None  # evaluation data (None: the generated validation split); needed with `data`
    model: str | None = None  # None: the embedded default (cmalign-tiny from its cached base)
    pretrained: str | None = None
    steps: int | None = None  # None: fit's default
    fit_overrides: dict = field(default_factory=dict)  # any `cmalign fit --set` key, for every run
    variants: dict = field(default_factory=dict)  # name -> fit overrides incl. alpha_target: extra runs (ablations)
    baselines: bool = True  # evaluate the base model with the post-hoc fixes
    max_zeroshot_drop: float = 0.05  # relative to the reference (the α = 0 run, else the base model)
    select: str = "gap"  # gap | ari | cider: what the recommendation maximises
    jobs: int = 1
    seed: int = 0
    max_images: int | None = None  # eval: images of the evaluation data (None: all)
    fit_images: int = 1000  # eval: images for the caption decoder and post-hoc fits
    decoder_epochs: int = 6
    overwrite: bool = False
    engine: str = "local"  # or "ray": each run a Ray task (cmalign.cluster.sweep)
    cluster: RayOptions = field(default_factory=RayOptions)  # ray: the address and each run's cpus/gpus

    def identity(self) -> dict:
        """What makes two sweeps the same (alphas, variants, jobs, engine, selection may change on a re-run)."""
        d = asdict(self)
        for k in ("alphas", "variants", "jobs", "max_zeroshot_drop", "select", "overwrite", "baselines", "out",
                  "engine", "cluster"):
            d.pop(k)
        return d
