"""Studies over a fleet of machines on Ray (`--executor ray`, the `moerun[ray]` extra).

Each machine joins the cluster with `ray start`, advertising one unit of the custom resource
``moerun-hw:<label>`` (``--resources='{"moerun-hw:jetson-orin-nano-8gb": 1}'``). A point
carries the label of the hardware it runs on; its Ray task asks for that one unit, so Ray
places it on a node with the label and never runs two moerun measurements on one node at
once, even from two studies. Inside the node the point runs exactly as on one machine
(`moerun.study.LocalExecutor`: a child process with its timeout, crash and out-of-memory
handling), after the node has captured its own environment (CPU, bandwidth probe, a look at
contention) and written the synthetic checkpoint from the spec and seed into its own cache,
so every node measures byte-identical weights without any transfer through the object store.

The study side (`moerun.study.run_study`) runs one lane per label: rounds within a label in
order, labels in parallel. A point whose label no live node offers is `unavailable`; a node
that dies mid-point gives that point a `failed` record with the reason. Both are marked
``retry`` so that rerunning the study (resume) measures them again.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import attrs

from . import defaults
from .errors import ConfigError, MoerunError

RESOURCE_PREFIX = "moerun-hw:"
POLL_S = 2.0  # how often a waiting point checks that its label still has a live node


def resource(label: str) -> str:
    """The Ray custom resource a node with `label` advertises (one unit)."""
    return RESOURCE_PREFIX + label


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray on this machine and on every node: "
                          "pip install 'moerun[ray]'") from None
    return ray


def connect(address: str | None) -> str:
    """Join the Ray cluster at `address` (default: $RAY_ADDRESS, else the cluster `ray start`
    left on this machine); a one-line error when there is none. Returns the address used."""
    ray = _ray()
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    if ray.is_initialized():
        return address
    hint = "start one with 'ray start --head --resources='{\"moerun-hw:LABEL\": 1}'' or give --ray-address"
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and "://" not in address:  # Ray retries a dead GCS for minutes: look first
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise ConfigError(f"no Ray cluster at {address} ({exc.strerror or exc}); {hint}") from None
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"no Ray cluster at {address} ({first}); {hint}") from None
    return address


def cluster_labels() -> dict[str, list[dict[str, Any]]]:
    """{label: [live node, ...]} of every live node advertising a moerun hardware label."""
    ray = _ray()
    labels: dict[str, list[dict[str, Any]]] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        for name in node.get("Resources") or {}:
            if name.startswith(RESOURCE_PREFIX):
                labels.setdefault(name[len(RESOURCE_PREFIX):], []).append(
                    {"node_id": node.get("NodeID"), "hostname": node.get("NodeManagerHostname"),
                     "address": node.get("NodeManagerAddress")})
    return labels


def describe_labels(labels: dict[str, list[dict[str, Any]]]) -> str:
    """'alpha (1 node: host-a), beta (2 nodes: host-b, host-c)' or 'none'."""
    if not labels:
        return "none"
    return ", ".join(f"{label} ({len(nodes)} node{'s' if len(nodes) != 1 else ''}: "
                     f"{', '.join(sorted({str(n['hostname']) for n in nodes}))})"
                     for label, nodes in sorted(labels.items()))


def _infrastructure_failure(point: Any, status: str, error: str, node: dict[str, Any] | None = None) -> dict[str, Any]:
    """A record for a point the fleet could not measure (no node, node lost): `retry` makes a
    resumed study measure it again."""
    from .results import base_result

    result = base_result(point, None)
    result.update(status=status, error=error, retry=True, node=node or {"hardware": point.hardware})
    return result


def _first_sentences(text: str, limit: int = 240) -> str:
    """Ray's error text up to the last full sentence within `limit` characters."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return text[: cut + 1] if cut > 0 else text[:limit] + "..."


@attrs.define
class RayExecutor:
    """Runs each point as a Ray task on a node labelled with the point's hardware. `lane`
    tells the study which points may run in parallel (different labels)."""

    address: str | None = None
    if_busy: str = defaults.IF_BUSY
    wait_s: float = defaults.WAIT_S
    _remote: Any = attrs.field(default=None, init=False, repr=False)

    def lane(self, point: Any) -> str | None:
        return point.hardware

    def labels(self) -> dict[str, list[dict[str, Any]]]:
        connect(self.address)
        return cluster_labels()

    def run(self, point: Any) -> dict[str, Any]:
        ray = _ray()
        connect(self.address)
        if point.hardware is None:
            raise ConfigError("the ray executor places points by hardware label: give --hardware or "
                              "hardware = [...] in the study file")
        labels = cluster_labels()
        if point.hardware not in labels:
            return _infrastructure_failure(
                point, "unavailable",
                f"no live Ray node offers hardware {point.hardware!r} (resource {resource(point.hardware)}); "
                f"labels on the cluster: {describe_labels(labels)}")
        if self._remote is None:
            self._remote = ray.remote(measure_on_node)
        ref = self._remote.options(resources={resource(point.hardware): 1}, num_cpus=0, max_retries=0,
                                   name=f"moerun:{point.model}@{point.backend}").remote(
            point.to_dict(), point.hardware, self.if_busy, self.wait_s)
        while True:
            ready, _ = ray.wait([ref], timeout=POLL_S)
            if ready:
                break
            if point.hardware not in cluster_labels():
                # the label's last node left: a task still queued for it would wait forever
                ray.cancel(ref, force=True)
                return _infrastructure_failure(
                    point, "failed", f"node lost mid-point: every node labelled {point.hardware!r} left the "
                                     f"Ray cluster while the point was placed or running")
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as exc:
            return _infrastructure_failure(
                point, "failed", f"node lost mid-point ({type(exc).__name__}: {_first_sentences(str(exc))})",
                {"hardware": point.hardware, "candidates": labels[point.hardware]})


def measure_on_node(point_dict: dict[str, Any], label: str, if_busy: str = defaults.IF_BUSY,
                    wait_s: float = defaults.WAIT_S) -> dict[str, Any]:
    """The Ray task body, on the node: the same preparation as on one machine
    (moerun.prepare: a look at contention, this node's environment, the checkpoint written
    into this node's cache), then the point measured as on one machine."""
    from .manager import get_plugin_manager
    from .point import Point
    from .prepare import BusyError, prepare_machine
    from .results import base_result
    from .study import LocalExecutor

    point = Point.from_dict(point_dict)
    node = {"hardware": label, "hostname": socket.gethostname(), "pid": os.getpid()}
    try:
        import ray

        node["node_id"] = ray.get_runtime_context().get_node_id()
        node["address"] = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - called outside a Ray worker (tests of the body itself)
        pass
    plugins = get_plugin_manager()
    try:
        prepared = prepare_machine(plugins, [point], if_busy=if_busy, wait_s=wait_s)
    except BusyError as exc:
        return _infrastructure_failure(point, "unavailable", f"node {node['hostname']}: {exc}", node)
    except MoerunError as exc:
        result = base_result(point, None)
        result["error"] = f"on node {node['hostname']}: {str(exc).splitlines()[0]}"
        result["node"] = node
        return result
    if not Path(point.model).exists():
        node["checkpoint_s"] = round(prepared.checkpoint_s, 3)
    result = LocalExecutor(plugins=plugins, cache=prepared.cache, env=prepared.env, isolate=True).run(point)
    result["node"] = node
    return result
