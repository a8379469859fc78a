"""Past one machine: `cmalign embed --engine ray` and `cmalign sweep --engine ray` on a Ray cluster.

    connect.py  join (or start) a Ray instance, with errors that name the address; checks on every node
    embed.py    the embedding pipeline as Ray Data: decode tasks → an actor pool of onnxruntime sessions
    sweep.py    a sweep's fits and evaluations as Ray tasks with their resource requests

Ray is the optional extra ``cmalign[ray]``; nothing here is imported by the local engines. Public names load on
first use."""

from cmalign._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "connect": ("ClusterError", "RayOptions", "connect", "require_ray"),
    "embed": ("embed_on_ray",),
    "sweep": ("run_jobs_on_ray",),
})
