"""Joining a Ray cluster, and refusing early: an address that does not answer, a path a node cannot read or write.

Every check here runs before any work is scheduled, so a misconfigured cluster costs seconds, not a half-written
output directory.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cmalign.errors import CmalignError, ConfigError, MissingDependencyError

RAY_EXTRA = "pip install 'cmalign[ray]'"


class ClusterError(CmalignError, RuntimeError):
    """The Ray cluster cannot be reached, or one of its nodes cannot do the work (a path missing or read-only)."""


@dataclass
class RayOptions:
    """Where the work runs and how much each piece asks the cluster for."""

    address: str | None = None  # None: Ray's default (the instance `ray start` runs on this machine, else a new one
    # for this command); "local": always a new one; "auto": the running one; "ray://HOST:10001" or "HOST:6379"
    actors: int = 2  # embed: encoder actors, one onnxruntime session each
    cpus_per_actor: float | None = None  # None: 1 with a GPU, else a share that leaves room for the decode tasks
    gpus_per_actor: float | None = None  # None: 1 with --provider cuda, else 0
    decode_cpus: float = 0.25  # the CPU each image-decoding task asks for (Ray's CPUs are logical)
    cpus_per_run: float = 1.0  # sweep: CPUs each fit + eval asks for (its torch threads)
    gpus_per_run: float = 0.0  # sweep: GPUs each fit + eval asks for

    def check(self) -> None:
        if self.actors < 1:
            raise ConfigError(f"--actors must be at least 1, got {self.actors}")
        for name in ("cpus_per_actor", "gpus_per_actor", "decode_cpus", "cpus_per_run", "gpus_per_run"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


def require_ray():
    """The ``ray`` module, or an error saying which extra installs it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the embedding pipeline needs Ray Data, which `ray` alone lacks)
    except ImportError as e:
        raise MissingDependencyError(f"--engine ray needs Ray Data, which is not installed ({e}); {RAY_EXTRA}") from e
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """HOST and PORT of an explicit address (``ray://HOST:PORT`` or ``HOST:PORT``); None for ``auto``."""
    if address in ("auto", "local"):
        return None
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"--address {address!r}: expected auto, local, ray://HOST:PORT or HOST:PORT")
    return host.strip("[]"), int(port)


def connect(address: str | None, log: Callable[[str], None] | None = None) -> dict:
    """Join the cluster at ``address`` (or start a local instance); what it has, as {"address", "nodes", "cpus",
    "gpus"}. A process already connected (a test, a notebook) keeps its connection."""
    ray = require_ray()
    say = log or (lambda _m: None)
    if not ray.is_initialized():
        if address:
            target = _host_port(address)
            if target is not None:  # ray.init would retry an address that does not answer for a minute or more
                try:
                    socket.create_connection(target, timeout=5).close()
                except OSError as e:
                    raise ClusterError(f"cannot reach the Ray cluster at {address} ({e}); is `ray start --head` "
                                       "running there, and is the port open from this machine?") from None
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home from a closed network
        say(f"connecting to the Ray cluster at {address}" if address not in (None, "local")
            else "starting (or joining) the Ray instance on this machine")
        try:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
            raise ClusterError(f"cannot reach the Ray cluster at {address or 'a new local instance'}: {e}") from None
    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"address": address or "local", "nodes": len(nodes), "cpus": float(resources.get("CPU", 0)),
            "gpus": float(resources.get("GPU", 0))}


def path_problem(read: list[str], write: list[str], exports: dict[str, str] | None = None) -> str | None:
    """On one node: the first path it cannot read or write, or an export (dir → fingerprint) whose manifest names
    another fingerprint, as a message; None when all is well."""
    for path in read:
        if not os.path.exists(path) or not os.access(path, os.R_OK):
            return f"{path} is missing or unreadable"
    for path, expected in (exports or {}).items():
        try:
            found = json.loads((Path(path) / "manifest.json").read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError) as e:
            return f"{path}/manifest.json cannot be read ({e})"
        if found != expected:
            return f"the export at {path} has fingerprint {found}, not {expected} as on this machine (another export)"
    for path in write:
        target = Path(path)
        try:
            target.mkdir(parents=True, exist_ok=True)
            probe = target / f".cmalign-write-check-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            return f"cannot write to {path} ({e.strerror or e})"
    return None


def check_every_node(read: list[str] = (), write: list[str] = (), exports: dict[str, str] | None = None) -> None:
    """Run the path checks on every live node (one zero-CPU task pinned to each); a ClusterError names the first
    node and path that fail. The same absolute paths must work on every node: a shared file system or mount."""
    ray = require_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check = ray.remote(num_cpus=0)(path_problem)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote([str(Path(p).resolve()) for p in read], [str(Path(p).resolve()) for p in write],
                    {str(Path(p).resolve()): f for p, f in (exports or {}).items()})
            for n in nodes]
    for node, problem in zip(nodes, ray.get(refs), strict=True):
        if problem:
            raise ClusterError(f"node {node.get('NodeManagerAddress', node['NodeID'])}: {problem}. Every node must "
                               "see the same paths (a shared file system or mount); nothing was scheduled")


def check_fits(info: dict, cpus: float, gpus: float, what: str) -> None:
    """Refuse a per-task request no node of the cluster can ever grant (Ray would wait for it forever)."""
    if gpus > info["gpus"]:
        raise ClusterError(f"{what}: each piece asks for {gpus:g} GPU(s) but the cluster at {info['address']} has "
                           f"{info['gpus']:g}; nothing was scheduled")
    if cpus > info["cpus"]:
        raise ClusterError(f"{what}: each piece asks for {cpus:g} CPU(s) but the cluster at {info['address']} has "
                           f"{info['cpus']:g}; nothing was scheduled")
