"""The scheduler: bind each unscheduled Pod to the least-loaded Ready node it tolerates.

`choose_node` is pure (pod, nodes, pods -> node name or the reason none fits); the loop binds
through the API (pods/{name}/binding) and remembers its own bindings until the watch shows them,
so a burst of pods is spread out rather than piled on one node.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import time

from netplane.objects import key_of

log = logging.getLogger("scheduler")
TERMINAL = ("Succeeded", "Failed")


def node_is_ready(node: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in node.get("status", {}).get("conditions") or [])


def tolerates(taint: dict, tolerations: list[dict]) -> bool:
    for tol in tolerations:
        if tol.get("effect") and tol["effect"] != taint.get("effect"):
            continue
        if tol.get("operator") == "Exists":
            if not tol.get("key") or tol["key"] == taint.get("key"):
                return True
        elif tol.get("key") == taint.get("key") and tol.get("value", "") == taint.get("value", ""):
            return True
    return False


def blocking_taints(node: dict, pod: dict) -> list[dict]:
    tolerations = pod.get("spec", {}).get("tolerations") or []
    return [t for t in node.get("spec", {}).get("taints") or []
            if t.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(t, tolerations)]


def pods_per_node(pods: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for pod in pods:
        node = pod.get("spec", {}).get("nodeName")
        if node and pod.get("status", {}).get("phase") not in TERMINAL:
            counts[node] = counts.get(node, 0) + 1
    return counts


def controller_uid(pod: dict) -> str | None:
    return next((ref.get("uid") for ref in pod["metadata"].get("ownerReferences") or [] if ref.get("controller")),
                None)


def siblings_per_node(pod: dict, pods: list[dict]) -> dict[str, int]:
    """Per node, the pods of the same controller (ReplicaSet) already there."""
    owner = controller_uid(pod)
    if owner is None:
        return {}
    return pods_per_node([p for p in pods if controller_uid(p) == owner])


def choose_node(pod: dict, nodes: list[dict], load: dict[str, int],
                siblings: dict[str, int] | None = None) -> tuple[str | None, str]:
    """(node name, "") for the best fitting node; or (None, why not).

    Best: fewest pods of the same controller (spread replicas, as kube-scheduler's default
    topology spreading does), then least loaded, then by name."""
    siblings = siblings or {}
    wanted = pod.get("spec", {}).get("nodeSelector") or {}
    fitting, reasons = [], {}
    for node in nodes:
        name = node["metadata"]["name"]
        labels = node["metadata"].get("labels") or {}
        if not node_is_ready(node):
            reasons[name] = "not Ready"
        elif node.get("spec", {}).get("unschedulable"):
            reasons[name] = "unschedulable"
        elif any(labels.get(k) != v for k, v in wanted.items()):
            reasons[name] = "node selector does not match"
        elif taints := blocking_taints(node, pod):
            reasons[name] = f"untolerated taint {taints[0].get('key')}"
        else:
            fitting.append(name)
    if not fitting:
        detail = "; ".join(f"{n}: {r}" for n, r in sorted(reasons.items())) or "no nodes"
        return None, f"0/{len(nodes)} nodes are available: {detail}"
    return min(fitting, key=lambda n: (siblings.get(n, 0), load.get(n, 0), n)), ""


def needs_scheduling(pod: dict) -> bool:
    return (not pod.get("spec", {}).get("nodeName") and not pod["metadata"].get("deletionTimestamp")
            and pod.get("status", {}).get("phase") not in TERMINAL)


class Scheduler:
    def __init__(self, client, view):
        from netplane.events import EventRecorder
        self.client = client
        self.view = view
        self.events = EventRecorder(client, "default-scheduler")
        self.recent: dict[tuple[str, str], tuple[str, float]] = {}  # pod key -> (node, when)
        self.unschedulable: dict[tuple[str, str], str] = {}

    def load(self, pods: list[dict], now: float) -> dict[str, int]:
        counts = pods_per_node(pods)
        seen = {key_of(p) for p in pods if p.get("spec", {}).get("nodeName")}
        for key, (node, when) in list(self.recent.items()):
            if key in seen or now - when > 30:
                del self.recent[key]
            else:
                counts[node] = counts.get(node, 0) + 1
        return counts

    async def sync(self) -> None:
        if not self.view.is_synced():
            return
        from netplane.client import APIError
        pods, nodes, now = self.view.list("Pod"), self.view.list("Node"), time.time()
        load = self.load(pods, now)
        for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", "")):
            key = key_of(pod)
            if not needs_scheduling(pod) or key in self.recent:
                continue
            node, why = choose_node(pod, nodes, load, self.siblings(pod, pods))
            try:
                if node is None:
                    await self.report_unschedulable(pod, why)
                    continue
                await self.client.bind(pod["metadata"]["name"], pod["metadata"]["namespace"], node)
                self.recent[key] = (node, now)
                self.unschedulable.pop(key, None)
                load[node] = load.get(node, 0) + 1
                log.info("bound %s/%s to %s", *key, node)
                self.events.emit(pod, "Normal", "Scheduled", f"Successfully assigned {key[0]}/{key[1]} to {node}")
            except APIError as err:
                log.warning("binding %s/%s failed: %s", *key, err)

    def siblings(self, pod: dict, pods: list[dict]) -> dict[str, int]:
        """Siblings per node, counting this process's bindings the watch has not shown yet."""
        counts = siblings_per_node(pod, pods)
        owner = controller_uid(pod)
        by_key = {key_of(p): p for p in pods}
        for key, (node, _when) in self.recent.items():
            other = by_key.get(key)
            if other is not None and not other.get("spec", {}).get("nodeName") and controller_uid(other) == owner:
                counts[node] = counts.get(node, 0) + 1
        return counts

    async def report_unschedulable(self, pod: dict, why: str) -> None:
        key = key_of(pod)
        if self.unschedulable.get(key) == why:
            return
        condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": why}
        await self.client.patch("Pod", key[1], {"status": {"phase": "Pending", "conditions": [condition]}},
                                key[0], "status")
        self.unschedulable[key] = why
        log.info("cannot schedule %s/%s: %s", *key, why)
        self.events.emit(pod, "Warning", "FailedScheduling", why)


def main(argv: list[str]) -> int:
    from netplane import daemon
    from netplane.client import resolve_server, watch_and_sync

    parser = argparse.ArgumentParser(prog="netplane scheduler")
    parser.add_argument("--server")
    parser.add_argument("--health-listen")
    args = parser.parse_args(argv)
    daemon.setup_logging("scheduler")

    async def run(stop: asyncio.Event) -> None:
        await watch_and_sync(resolve_server(args.server), ["Pod", "Node"],
                             lambda client, view: Scheduler(client, view).sync,
                             stop, min_interval=0.02, periodic=5.0)

    return daemon.run(run, "scheduler", args.health_listen)
