"""`cmalign sweep --engine ray`: each α's fit + eval (and the base model's eval) as one Ray task.

A task asks for ``cpus_per_run`` CPUs (its torch threads) and ``gpus_per_run`` GPUs, so Ray packs the runs onto the
cluster's nodes; each writes the ordinary sweep layout (OUT/runs/<name>, OUT/evals/<name>), which must therefore be
on a path every node can write. Runs resume exactly as the local engine's do: a task whose worker dies is retried
by Ray and continues from the run's last checkpoint; a sweep run again keeps every finished run and eval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cmalign.cluster.connect import RayOptions, check_every_node, check_fits, connect, require_ray


def run_jobs_on_ray(job: Callable[[tuple], dict], jobs: Sequence[tuple], opts: RayOptions, *, out: str,
                    read: Sequence[str] = (), describe: Callable[[dict], str] = str,
                    log: Callable[[str], None] | None = None) -> list[dict]:
    """``job(args)`` for every ``args`` in ``jobs``, as Ray tasks; their results, in the order they finish."""
    say = log or (lambda _m: None)
    opts.check()
    ray = require_ray()
    info = connect(opts.address, say)
    check_fits(info, opts.cpus_per_run, opts.gpus_per_run, "--cpus-per-run / --gpus-per-run")
    check_every_node(read=list(read), write=[out])
    say(f"{len(jobs)} run(s) on {info['nodes']} node(s) ({info['cpus']:g} CPUs, {info['gpus']:g} GPUs), each asking "
        f"for {opts.cpus_per_run:g} CPU / {opts.gpus_per_run:g} GPU")
    task = ray.remote(job).options(num_cpus=opts.cpus_per_run, num_gpus=opts.gpus_per_run, max_retries=3)
    pending = [task.remote(args) for args in jobs]
    done: list[dict] = []
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            done.append(ray.get(ready[0]))
        except ray.exceptions.RayTaskError as e:  # the job's own error (a bad dataset, say), not Ray's wrapper
            for ref in pending:
                ray.cancel(ref)
            raise e.as_instanceof_cause() from None
        say(f"[{len(done)}/{len(jobs)}] {describe(done[-1])}")
    return done
