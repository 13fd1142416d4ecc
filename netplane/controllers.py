"""The controller manager: Deployments -> ReplicaSets -> Pods, EndpointSlices, node pod CIDRs, GC.

Each controller is a pure function from the cached objects to a list of Actions; one level-triggered
loop recomputes them all after any change (coalesced) and applies the actions. Nothing runs before
every watch cache has synced.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import logging
import secrets
import string
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from netplane.objects import key_of, labels_of, matches_label_selector, matches_labels, pod_is_ready

log = logging.getLogger("controller-manager")

MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
SLICE_MANAGER = "endpointslice-controller.netplane.io"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
HEARTBEAT_GRACE_S = 20.0


@dataclass(frozen=True)
class Action:
    """create obj | patch kind/ns/name with a merge patch (optionally on a subresource) | delete."""
    verb: str
    kind: str
    namespace: str = ""
    name: str = ""
    body: dict = field(default_factory=dict, hash=False, compare=True)
    subresource: str | None = None
    # (object, type, reason, message): the Event recorded once the action is done (netplane.events)
    event: tuple | None = field(default=None, hash=False, compare=False)

    def describe(self) -> str:
        return f"{self.verb} {self.kind} {self.namespace + '/' if self.namespace else ''}{self.name}"


def create(obj: dict) -> Action:
    meta = obj["metadata"]
    return Action("create", obj["kind"], meta.get("namespace", ""), meta["name"], obj)


def patch(kind: str, obj: dict, body: dict, subresource: str | None = None) -> Action:
    namespace, name = key_of(obj)
    return Action("patch", kind, namespace, name, body, subresource)


def delete(kind: str, obj: dict) -> Action:
    namespace, name = key_of(obj)
    return Action("delete", kind, namespace, name)


def told(action: Action, obj: dict, reason: str, message: str) -> Action:
    """`action`, recording a Normal event about `obj` once done."""
    return replace(action, event=(obj, "Normal", reason, message))


def short_hash(value, length: int = 10) -> str:
    """A stable short lowercase hash of a JSON-able value (names derived from content)."""
    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()
    alphabet = string.digits + string.ascii_lowercase
    number = int.from_bytes(digest[:8], "big")
    out = []
    for _ in range(length):
        number, rest = divmod(number, len(alphabet))
        out.append(alphabet[rest])
    return "".join(out)


def owner_reference(owner: dict) -> dict:
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def controlled_by(obj: dict, owner: dict) -> bool:
    uid = owner["metadata"].get("uid")
    return any(ref.get("uid") == uid and ref.get("controller")
               for ref in obj["metadata"].get("ownerReferences") or [])


def is_terminating(obj: dict) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))


# --------------------------------------------------------------------------------------------
# Deployments


def zero_values_dropped(value):
    """`value` without nulls and empty objects or lists, at any depth: what Go's structs make of a
    template (a `creationTimestamp: null` or `resources: {}` that `kubectl rollout undo` sends back is
    the same template as one without them, so it must give the same ReplicaSet)."""
    if isinstance(value, dict):
        pairs = ((k, zero_values_dropped(v)) for k, v in value.items())
        return {k: v for k, v in pairs if v is not None and v != {} and v != []}
    if isinstance(value, list):
        return [zero_values_dropped(v) for v in value]
    return value


def replicaset_for(deploy: dict) -> dict:
    """The ReplicaSet a Deployment's current pod template calls for."""
    template = deploy["spec"]["template"]
    template_hash = short_hash(zero_values_dropped(template))
    labels = {**(template.get("metadata", {}).get("labels") or {}), "pod-template-hash": template_hash}
    selector = dict(deploy["spec"]["selector"])
    selector["matchLabels"] = {**(selector.get("matchLabels") or {}), "pod-template-hash": template_hash}
    meta = deploy["metadata"]
    return {
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": f"{meta['name']}-{template_hash}", "namespace": meta["namespace"],
                     "labels": labels, "ownerReferences": [owner_reference(deploy)]},
        "spec": {"replicas": deploy["spec"].get("replicas", 1), "selector": selector,
                 "template": {**template, "metadata": {**template.get("metadata", {}), "labels": labels}}},
    }


REVISION = "deployment.kubernetes.io/revision"
CHANGE_CAUSE = "kubernetes.io/change-cause"


def revision_of(obj: dict) -> int:
    try:
        return int(((obj.get("metadata") or {}).get("annotations") or {}).get(REVISION, "0"))
    except ValueError:
        return 0


def _revision_actions(deploy: dict, current: dict | None, wanted: dict, owned: list[dict]) -> list[Action]:
    """Revisions as the deployment controller numbers them (what `kubectl rollout history` lists and
    `rollout undo` goes back by): a new ReplicaSet gets the next number, an old one that becomes
    current again (a rollback) too, and the Deployment carries its current ReplicaSet's number."""
    others = max((revision_of(rs) for rs in owned if rs is not current), default=0)
    cause = ((deploy["metadata"].get("annotations") or {}).get(CHANGE_CAUSE))
    stamp = {REVISION: str(others + 1), **({CHANGE_CAUSE: cause} if cause else {})}
    actions = []
    if current is None:
        wanted["metadata"]["annotations"] = stamp
        revision = others + 1
    elif revision_of(current) <= others:
        actions.append(patch("ReplicaSet", current, {"metadata": {"annotations": stamp}}))
        revision = others + 1
    else:
        revision = revision_of(current)
        if cause and (current["metadata"].get("annotations") or {}).get(CHANGE_CAUSE) != cause:
            actions.append(patch("ReplicaSet", current, {"metadata": {"annotations": {CHANGE_CAUSE: cause}}}))
    if (deploy["metadata"].get("annotations") or {}).get(REVISION) != str(revision):
        actions.append(patch("Deployment", deploy, {"metadata": {"annotations": {REVISION: str(revision)}}}))
    return actions


def reconcile_deployment(deploy: dict, replicasets: list[dict]) -> list[Action]:
    if is_terminating(deploy):
        return []
    wanted = replicaset_for(deploy)
    owned = [rs for rs in replicasets if controlled_by(rs, deploy)]
    current = next((rs for rs in owned if rs["metadata"]["name"] == wanted["metadata"]["name"]), None)
    replicas = deploy["spec"].get("replicas", 1)
    actions: list[Action] = _revision_actions(deploy, current, wanted, owned)
    if current is None:
        actions.append(told(create(wanted), deploy, "ScalingReplicaSet",
                            f"Scaled up replica set {wanted['metadata']['name']} to {replicas}"))
    elif current["spec"].get("replicas") != replicas:
        actions.append(told(patch("ReplicaSet", current, {"spec": {"replicas": replicas}}), deploy, "ScalingReplicaSet",
                            _scaled(current, replicas)))
    for old in owned:
        if old is not current and old["spec"].get("replicas", 0) != 0:
            actions.append(told(patch("ReplicaSet", old, {"spec": {"replicas": 0}}), deploy, "ScalingReplicaSet",
                                _scaled(old, 0)))
    status = {
        "observedGeneration": deploy["metadata"].get("generation", 1),
        "replicas": sum(rs.get("status", {}).get("replicas", 0) for rs in owned),
        "readyReplicas": sum(rs.get("status", {}).get("readyReplicas", 0) for rs in owned),
        "availableReplicas": sum(rs.get("status", {}).get("readyReplicas", 0) for rs in owned),
        "updatedReplicas": (current or {}).get("status", {}).get("replicas", 0),
    }
    if _differs(deploy.get("status") or {}, status):
        actions.append(patch("Deployment", deploy, {"status": status}, "status"))
    return actions


def _differs(have: dict, want: dict) -> bool:
    return any(have.get(k, 0) != v for k, v in want.items())


# --------------------------------------------------------------------------------------------
# ReplicaSets


def new_pod(rs: dict, suffix: str) -> dict:
    template = rs["spec"]["template"]
    meta = rs["metadata"]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{meta['name']}-{suffix}", "namespace": meta["namespace"],
                     "labels": dict(template.get("metadata", {}).get("labels") or {}),
                     "annotations": dict(template.get("metadata", {}).get("annotations") or {}),
                     "ownerReferences": [owner_reference(rs)]},
        "spec": json.loads(json.dumps(template.get("spec", {}))),
    }


def scale_down_order(pod: dict) -> tuple:
    """Pods to delete first: unscheduled, then not ready, then the newest."""
    created = pod["metadata"].get("creationTimestamp", "")
    return (bool(pod["spec"].get("nodeName")), pod_is_ready(pod), _negated(created))


def _negated(timestamp: str) -> tuple:
    return tuple(-ord(c) for c in timestamp)


def _scaled(rs: dict, replicas: int) -> str:
    way = "up" if replicas > rs["spec"].get("replicas", 0) else "down"
    return f"Scaled {way} replica set {rs['metadata']['name']} to {replicas}"


def reconcile_replicaset(rs: dict, pods: list[dict], new_suffix=None) -> list[Action]:
    if is_terminating(rs):
        return []
    new_suffix = new_suffix or random_suffix
    owned = [p for p in pods if controlled_by(p, rs) and not is_terminating(p)
             and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")]
    diff = rs["spec"].get("replicas", 1) - len(owned)
    actions: list[Action] = []
    if diff > 0:
        for pod in (new_pod(rs, new_suffix()) for _ in range(diff)):
            actions.append(told(create(pod), rs, "SuccessfulCreate", f"Created pod: {pod['metadata']['name']}"))
    elif diff < 0:
        actions += [told(delete("Pod", p), rs, "SuccessfulDelete", f"Deleted pod: {p['metadata']['name']}")
                    for p in sorted(owned, key=scale_down_order)[:-diff]]
    status = {"replicas": len(owned), "readyReplicas": sum(1 for p in owned if pod_is_ready(p)),
              "observedGeneration": rs["metadata"].get("generation", 1)}
    if _differs(rs.get("status") or {}, status):
        actions.append(patch("ReplicaSet", rs, {"status": status}, "status"))
    return actions


def random_suffix() -> str:
    alphabet = "bcdfghjklmnpqrstvwxz2456789"  # as Kubernetes: no vowels, no look-alikes
    return "".join(secrets.choice(alphabet) for _ in range(5))


# --------------------------------------------------------------------------------------------
# DaemonSets: one pod on every node the template fits (its nodeSelector, the taints it tolerates),
# placed by the controller itself (spec.nodeName), replaced node by node when the template changes.

REVISION_LABEL = "controller-revision-hash"
# What the DaemonSet controller adds to its pods, as Kubernetes does: a node agent runs through these.
DAEMON_TOLERATIONS = [
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/disk-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/memory-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/pid-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"},
]


def daemon_pod(ds: dict, node_name: str, suffix: str) -> dict:
    pod = new_pod(ds, suffix)
    pod["metadata"]["labels"][REVISION_LABEL] = short_hash(zero_values_dropped(ds["spec"]["template"]))
    spec = pod["spec"]
    spec["nodeName"] = node_name
    own = spec.get("tolerations") or []
    spec["tolerations"] = own + [t for t in DAEMON_TOLERATIONS if t not in own]
    return pod


def daemon_nodes(ds: dict, nodes: list[dict]) -> list[str]:
    """The nodes a DaemonSet's pods belong on."""
    from netplane.scheduler import blocking_taints
    probe = daemon_pod(ds, "", "probe")
    selector = probe["spec"].get("nodeSelector") or {}
    return sorted(n["metadata"]["name"] for n in nodes   # a nodeSelector: every label it names, as given
                  if all(labels_of(n).get(k) == v for k, v in selector.items()) and not blocking_taints(n, probe))


def _max_unavailable(ds: dict, desired: int) -> int:
    value = (((ds["spec"].get("updateStrategy") or {}).get("rollingUpdate") or {}).get("maxUnavailable", 1))
    if isinstance(value, str) and value.endswith("%") and value[:-1].isdigit():
        return max(1, -(-desired * int(value[:-1]) // 100))
    return max(1, value) if isinstance(value, int) and not isinstance(value, bool) else 1


def reconcile_daemonset(ds: dict, nodes: list[dict], pods: list[dict], new_suffix=None) -> list[Action]:
    if is_terminating(ds):
        return []
    new_suffix = new_suffix or random_suffix
    revision = short_hash(zero_values_dropped(ds["spec"]["template"]))
    wanted = daemon_nodes(ds, nodes)
    owned = [p for p in pods if controlled_by(p, ds) and not is_terminating(p)]
    by_node: dict[str, list[dict]] = {}
    for pod in sorted(owned, key=lambda p: (labels_of(p).get(REVISION_LABEL) != revision, not pod_is_ready(p),
                                            p["metadata"]["name"])):
        by_node.setdefault(pod["spec"].get("nodeName") or "", []).append(pod)
    actions: list[Action] = []

    def remove(pod: dict, why: str) -> None:
        actions.append(told(delete("Pod", pod), ds, "SuccessfulDelete", f"Deleted pod: {pod['metadata']['name']} ({why})"))

    placed = {}
    for node, node_pods in sorted(by_node.items()):
        if node not in wanted:
            for pod in node_pods:
                remove(pod, f"node {node or '<none>'} is not one of the DaemonSet's")
            continue
        keep, *extra = node_pods
        for pod in extra:
            remove(pod, f"one pod per node: {node} has {keep['metadata']['name']}")
        if keep.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            remove(keep, "it stopped: a daemon runs again")
        else:
            placed[node] = keep
    for node in wanted:
        if node not in placed:
            pod = daemon_pod(ds, node, new_suffix())
            actions.append(told(create(pod), ds, "SuccessfulCreate", f"Created pod: {pod['metadata']['name']}"))
    strategy = (ds["spec"].get("updateStrategy") or {}).get("type") or "RollingUpdate"
    ready = [n for n in wanted if n in placed and pod_is_ready(placed[n])]
    if strategy == "RollingUpdate":   # replace old pods while no more than maxUnavailable nodes lack a ready one
        budget = _max_unavailable(ds, len(wanted)) - (len(wanted) - len(ready))
        old = [placed[n] for n in wanted if n in placed and labels_of(placed[n]).get(REVISION_LABEL) != revision]
        for pod in sorted(old, key=lambda p: pod_is_ready(p))[:max(0, budget)]:
            remove(pod, "its template changed")
    status = {"desiredNumberScheduled": len(wanted), "currentNumberScheduled": len(placed),
              "numberMisscheduled": sum(len(p) for n, p in by_node.items() if n not in wanted),
              "numberReady": len(ready), "numberAvailable": len(ready), "numberUnavailable": len(wanted) - len(ready),
              "updatedNumberScheduled": sum(1 for p in placed.values() if labels_of(p).get(REVISION_LABEL) == revision),
              "observedGeneration": ds["metadata"].get("generation", 1)}
    if _differs(ds.get("status") or {}, status):
        actions.append(patch("DaemonSet", ds, {"status": status}, "status"))
    return actions


# --------------------------------------------------------------------------------------------
# StatefulSets: pods with stable names (web-0, web-1, ...), each its own DNS name under the governing
# headless Service (hostname + subdomain), made in order and each Ready before the next
# (OrderedReady), removed from the highest; a new template replaces them from the highest down.

POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"


def _revision(sts: dict) -> str:
    return f"{sts['metadata']['name']}-{short_hash(zero_values_dropped(sts['spec']['template']))}"


def stateful_pod(sts: dict, ordinal: int) -> dict:
    pod = new_pod(sts, str(ordinal))
    name = pod["metadata"]["name"]
    pod["metadata"]["labels"].update({REVISION_LABEL: _revision(sts), POD_NAME_LABEL: name,
                                      POD_INDEX_LABEL: str(ordinal)})
    pod["spec"]["hostname"] = name
    if sts["spec"].get("serviceName"):
        pod["spec"]["subdomain"] = sts["spec"]["serviceName"]
    return pod


def _ordinal(pod: dict, sts: dict) -> int | None:
    prefix, name = sts["metadata"]["name"] + "-", pod["metadata"]["name"]
    tail = name[len(prefix):] if name.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else None


def reconcile_statefulset(sts: dict, pods: list[dict]) -> list[Action]:
    if is_terminating(sts):
        return []
    spec, have = sts["spec"], sts.get("status") or {}
    replicas, revision = spec.get("replicas", 1), _revision(sts)
    ordered = spec.get("podManagementPolicy", "OrderedReady") != "Parallel"
    by_ordinal = {}
    for pod in pods:
        if controlled_by(pod, sts) and not is_terminating(pod) and _ordinal(pod, sts) is not None:
            by_ordinal[_ordinal(pod, sts)] = pod
    actions: list[Action] = []

    def made(ordinal: int) -> None:
        pod = stateful_pod(sts, ordinal)
        actions.append(told(create(pod), sts, "SuccessfulCreate",
                            f"create Pod {pod['metadata']['name']} in StatefulSet {sts['metadata']['name']} successful"))

    def removed(pod: dict) -> None:
        actions.append(told(delete("Pod", pod), sts, "SuccessfulDelete",
                            f"delete Pod {pod['metadata']['name']} in StatefulSet {sts['metadata']['name']} successful"))

    blocked = False   # OrderedReady: nothing past a pod that is missing or not Ready
    for ordinal in range(replicas):
        pod = by_ordinal.get(ordinal)
        if pod is not None and (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            removed(pod)   # a stateful pod that stopped is made again, under the same name
            pod = None
        if pod is None:
            if not blocked or not ordered:
                made(ordinal)
            blocked = True
        elif not pod_is_ready(pod):
            blocked = True
    extra = sorted((o for o in by_ordinal if o >= replicas), reverse=True)
    if extra and not (ordered and blocked):
        for ordinal in extra[:1] if ordered else extra:
            removed(by_ordinal[ordinal])
    partition = ((spec.get("updateStrategy") or {}).get("rollingUpdate") or {}).get("partition", 0)
    rolling = (spec.get("updateStrategy") or {}).get("type", "RollingUpdate") == "RollingUpdate"
    current = [o for o in range(replicas) if o in by_ordinal]
    stale = [o for o in current if o >= partition and labels_of(by_ordinal[o]).get(REVISION_LABEL) != revision]
    if rolling and stale and not blocked and not extra:
        removed(by_ordinal[max(stale)])   # from the highest down, each made again with the new template
    ready = sum(1 for o in current if pod_is_ready(by_ordinal[o]))
    updated = sum(1 for o in current if labels_of(by_ordinal[o]).get(REVISION_LABEL) == revision)
    done = updated == replicas and ready == replicas
    older = next((labels_of(by_ordinal[o]).get(REVISION_LABEL) for o in current
                  if labels_of(by_ordinal[o]).get(REVISION_LABEL) != revision), revision)
    status = {"replicas": len(by_ordinal), "readyReplicas": ready, "availableReplicas": ready,
              "currentReplicas": updated if done else len(current) - updated, "updatedReplicas": updated,
              "updateRevision": revision, "currentRevision": revision if done else have.get("currentRevision", older),
              "observedGeneration": sts["metadata"].get("generation", 1)}
    if _differs(have, status):
        actions.append(patch("StatefulSet", sts, {"status": status}, "status"))
    return actions


# --------------------------------------------------------------------------------------------
# Jobs: pods run to completion, `completions` of them succeeding (with `parallelism` at a time), or
# the Job fails once more than `backoffLimit` have failed; finished Jobs go after
# ttlSecondsAfterFinished.


def _rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition_true(obj: dict, kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True" for c in (obj.get("status") or {}).get("conditions") or [])


def _finished(job: dict) -> bool:
    return _condition_true(job, "Complete") or _condition_true(job, "Failed")


JOB_BACKOFF_S, JOB_BACKOFF_MAX_S = 10.0, 360.0


def _retry_after(pods: list[dict], failed: int) -> float:
    """When a Job may make a pod again after its `failed` failures: 10 s after the last one, doubling
    with each, at most 6 min (Kubernetes' pod failure backoff)."""
    if not failed:
        return 0.0
    finished = [_parse_time((s.get("state") or {}).get("terminated", {}).get("finishedAt"))
                for p in pods if (p.get("status") or {}).get("phase") == "Failed"
                for s in (p.get("status") or {}).get("containerStatuses") or []]
    last = max((t for t in finished if t is not None), default=None)
    return 0.0 if last is None else last + min(JOB_BACKOFF_S * 2 ** (failed - 1), JOB_BACKOFF_MAX_S)


def _job_succeeded(completions: int | None, succeeded: int, active: int) -> bool:
    """`completions` pods succeeded; for a work queue (no completions), one did and none runs."""
    return succeeded >= completions if completions is not None else bool(succeeded) and not active


def reconcile_job(job: dict, pods: list[dict], now: float, new_suffix=None) -> list[Action]:
    if is_terminating(job):
        return []
    spec, have = job["spec"], job.get("status") or {}
    if _finished(job):
        ttl, done = spec.get("ttlSecondsAfterFinished"), _parse_time(have.get("completionTime"))
        if ttl is not None and done is not None and now >= done + ttl:
            return [delete("Job", job)]
        return []
    owned = [p for p in pods if controlled_by(p, job)]
    phase = lambda p: (p.get("status") or {}).get("phase")
    active = [p for p in owned if not is_terminating(p) and phase(p) not in ("Succeeded", "Failed")]
    # Counted from the pods, never below what was counted before (a finished pod may be deleted).
    succeeded = max(have.get("succeeded", 0), sum(1 for p in owned if phase(p) == "Succeeded"))
    failed = max(have.get("failed", 0), sum(1 for p in owned if phase(p) == "Failed"))
    completions, parallelism = spec.get("completions"), spec.get("parallelism", 1)
    at = _rfc3339(now)
    status = {"active": len(active), "succeeded": succeeded, "failed": failed,
              "ready": sum(1 for p in active if pod_is_ready(p)), "startTime": have.get("startTime") or at}
    actions: list[Action] = []
    outcome = None
    if failed > spec.get("backoffLimit", 6):
        outcome = ("Failed", "Warning", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    elif _job_succeeded(completions, succeeded, len(active)):
        outcome = ("Complete", "Normal", "Completed", "Job completed")
    elif not spec.get("suspend"):
        if completions is None:   # a work queue: once one pod succeeded, no new ones; the rest finish
            wanted = min(len(active), parallelism) if succeeded else parallelism
        else:
            wanted = min(parallelism, completions - succeeded)
        if now < _retry_after(owned, failed):
            wanted = min(wanted, len(active))   # backing off after a failure: no new pod yet
        for _ in range(wanted - len(active)):
            pod = new_pod(job, (new_suffix or random_suffix)())
            actions.append(told(create(pod), job, "SuccessfulCreate", f"Created pod: {pod['metadata']['name']}"))
        actions += [delete("Pod", p) for p in sorted(active, key=scale_down_order)[:max(0, len(active) - wanted)]]
    if outcome is not None:
        kind, event_type, reason, message = outcome
        actions += [delete("Pod", p) for p in active]   # what still runs stops with the Job
        status.update(active=0, ready=0, conditions=[*(have.get("conditions") or []), {
            "type": kind, "status": "True", "reason": reason, "message": message,
            "lastProbeTime": at, "lastTransitionTime": at}])
        if kind == "Complete":
            status["completionTime"] = at
        actions.append(replace(patch("Job", job, {"status": status}, "status"), event=(job, event_type, reason, message)))
    elif _differs(have, status):
        actions.append(patch("Job", job, {"status": status}, "status"))
    return actions


# --------------------------------------------------------------------------------------------
# CronJobs: a Job at each time the schedule names (the latest one missed, when several were),
# within startingDeadlineSeconds; concurrencyPolicy Allow, Forbid (skip while one runs) or Replace;
# only the newest finished Jobs kept (successfulJobsHistoryLimit, failedJobsHistoryLimit).

SCHEDULED_ANNOTATION = "batch.kubernetes.io/cronjob-scheduled-timestamp"


def job_for(cronjob: dict, at: datetime) -> dict:
    template = cronjob["spec"]["jobTemplate"]
    meta = cronjob["metadata"]
    stamp = at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": f"{meta['name']}-{int(at.timestamp() // 60)}", "namespace": meta["namespace"],
                         "labels": dict((template.get("metadata") or {}).get("labels") or {}),
                         "annotations": {**((template.get("metadata") or {}).get("annotations") or {}),
                                         SCHEDULED_ANNOTATION: stamp},
                         "ownerReferences": [owner_reference(cronjob)]},
            "spec": json.loads(json.dumps(template.get("spec") or {}))}


def _job_ref(job: dict) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
            "namespace": job["metadata"]["namespace"], "uid": job["metadata"].get("uid")}


def reconcile_cronjob(cronjob: dict, jobs: list[dict], now: float) -> list[Action]:
    from netplane import cron
    if is_terminating(cronjob):
        return []
    spec, have = cronjob["spec"], cronjob.get("status") or {}
    owned = sorted((j for j in jobs if controlled_by(j, cronjob)), key=lambda j: j["metadata"].get("creationTimestamp", ""))
    active = [j for j in owned if not _finished(j) and not is_terminating(j)]
    actions: list[Action] = []
    for kind, limit in (("Complete", spec.get("successfulJobsHistoryLimit", 3)), ("Failed", spec.get("failedJobsHistoryLimit", 1))):
        done = [j for j in owned if _condition_true(j, kind)]
        actions += [delete("Job", j) for j in done[:max(0, len(done) - limit)]]
    last = have.get("lastScheduleTime")
    try:
        schedule, tz = cron.parse(spec["schedule"]), cron.zone(spec.get("timeZone"))
    except (cron.ScheduleError, KeyError):
        return actions   # refused by the API when written; an old object keeps its history only
    boundary = datetime.fromtimestamp(_parse_time(last) or _parse_time(cronjob["metadata"].get("creationTimestamp"))
                                      or now, timezone.utc).astimezone(tz)
    at = schedule.latest(boundary, datetime.fromtimestamp(now, timezone.utc).astimezone(tz))
    deadline = spec.get("startingDeadlineSeconds")
    policy = spec.get("concurrencyPolicy", "Allow")
    status = {"active": [_job_ref(j) for j in active]}
    succeeded = [_parse_time((j.get("status") or {}).get("completionTime")) for j in owned if _condition_true(j, "Complete")]
    if any(succeeded):
        status["lastSuccessfulTime"] = _rfc3339(max(t for t in succeeded if t))
    if at is not None and not spec.get("suspend") and (deadline is None or now - at.timestamp() <= deadline) \
            and not (policy == "Forbid" and active):
        if policy == "Replace":
            actions += [delete("Job", j) for j in active]
        job = job_for(cronjob, at)
        actions.append(told(create(job), cronjob, "SuccessfulCreate", f"Created job {job['metadata']['name']}"))
        status["lastScheduleTime"] = _rfc3339(at.timestamp())
        if policy == "Replace":
            status["active"] = []
    current = {"active": [], **have}
    if any(current.get(k) != v for k, v in status.items()):
        actions.append(patch("CronJob", cronjob, {"status": status}, "status"))
    return actions


# --------------------------------------------------------------------------------------------
# EndpointSlices


def resolve_target_port(service_port: dict, pod: dict) -> int | None:
    target = service_port.get("targetPort", service_port.get("port"))
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    for container in pod["spec"].get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == target and port.get("protocol", "TCP") == service_port.get("protocol", "TCP"):
                return port.get("containerPort")
    return None


def _backends(service: dict, pods: list[dict]) -> dict[tuple, list[dict]] | None:
    """The pods a Service with a selector sends to, grouped by their resolved ports ((name, port,
    protocol), ...), by pod name; None for a Service whose endpoints nobody computes (no selector,
    ExternalName)."""
    spec = service.get("spec", {})
    if spec.get("type") == "ExternalName" or not spec.get("selector"):
        return None
    groups: dict[tuple, list[dict]] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        if (pod["metadata"].get("namespace") != service["metadata"]["namespace"]
                or not matches_labels(spec["selector"], labels_of(pod))
                or not pod.get("status", {}).get("podIP") or is_terminating(pod)
                or pod.get("status", {}).get("phase") in ("Succeeded", "Failed")):
            continue
        ports = []
        for sp in spec.get("ports") or []:
            number = resolve_target_port(sp, pod)
            if number is not None:
                ports.append((sp.get("name", ""), number, sp.get("protocol", "TCP")))
        groups.setdefault(tuple(ports), []).append(pod)
    return groups


def endpoint_slices_for(service: dict, pods: list[dict]) -> list[dict]:
    """The EndpointSlices a Service calls for: one per distinct set of resolved ports."""
    groups = _backends(service, pods)
    if groups is None:
        return []
    if not groups:
        groups[()] = []
    return [_slice(service, ports, members) for ports, members in sorted(groups.items())]


def _dns_hostname(pod: dict, service: dict) -> str | None:
    """The pod's name under the Service in DNS (web-0.nginx.default.svc...): its spec.hostname, when its
    spec.subdomain is the Service (a StatefulSet's pods under their governing Service)."""
    spec = pod.get("spec") or {}
    if spec.get("hostname") and spec.get("subdomain") == service["metadata"]["name"]:
        return spec["hostname"]
    return None


def _slice(service: dict, ports: tuple, pods: list[dict]) -> dict:
    endpoints = []
    for pod in pods:
        ready, hostname = pod_is_ready(pod), _dns_hostname(pod, service)
        endpoints.append({"addresses": [pod["status"]["podIP"]],
                          "conditions": {"ready": ready, "serving": ready, "terminating": False},
                          **({"hostname": hostname} if hostname else {}),
                          "nodeName": pod["spec"].get("nodeName"),
                          "targetRef": {"kind": "Pod", "namespace": pod["metadata"]["namespace"],
                                        "name": pod["metadata"]["name"], "uid": pod["metadata"].get("uid")}})
    return endpoint_slice(service, [list(ports)], SLICE_MANAGER, "IPv4", endpoints,
                          [{"name": name, "port": port, "protocol": proto} for name, port, proto in ports])


def endpoint_slice(service: dict, identity: list, manager: str, family: str, endpoints: list, ports: list) -> dict:
    """An EndpointSlice of `service`, named by its uid and `identity`, owned by it and by `manager`."""
    meta = service["metadata"]
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{meta['name']}-{short_hash([meta.get('uid'), *identity], 5)}",
                     "namespace": meta["namespace"],
                     "labels": {SERVICE_NAME_LABEL: meta["name"], MANAGED_BY: manager},
                     "ownerReferences": [owner_reference(service)]},
        "addressType": family, "endpoints": endpoints, "ports": ports,
    }


def reconcile_endpoint_slices(services: list[dict], pods: list[dict], slices: list[dict]) -> list[Action]:
    wanted = [want for service in services for want in endpoint_slices_for(service, pods)]
    return _reconcile_slices(wanted, slices, SLICE_MANAGER)


def _reconcile_slices(wanted: list[dict], slices: list[dict], manager: str) -> list[Action]:
    """Create, patch or delete the EndpointSlices `manager` owns so they are `wanted`."""
    ours = {key_of(s): s for s in slices if labels_of(s).get(MANAGED_BY) == manager}
    actions: list[Action] = []
    for want in wanted:
        have = ours.get(key_of(want))
        if have is None:
            actions.append(create(want))
        elif any(have.get(f) != want[f] for f in ("endpoints", "ports", "addressType")):
            actions.append(patch("EndpointSlice", have, {"endpoints": want["endpoints"], "ports": want["ports"]}))
    wanted_keys = {key_of(w) for w in wanted}
    actions += [delete("EndpointSlice", s) for k, s in sorted(ours.items()) if k not in wanted_keys]
    return actions


# --------------------------------------------------------------------------------------------
# Endpoints (core/v1): what `kubectl get endpoints` shows, and the other way round for a Service
# without a selector, whose Endpoints its user writes: mirrored into EndpointSlices, which the proxy
# and DNS read (Kubernetes' endpointslicemirroring controller).

ENDPOINTS_MANAGED_BY = "endpoints.kubernetes.io/managed-by"
ENDPOINTS_MANAGER = "endpoint-controller"
MIRROR_MANAGER = "endpointslicemirroring-controller.k8s.io"
SKIP_MIRROR = "endpointslice.kubernetes.io/skip-mirror"


def endpoints_for(service: dict, pods: list[dict]) -> dict | None:
    """The Endpoints of a Service with a selector: one subset per set of resolved ports, ready pods
    in addresses, the others in notReadyAddresses (as the Kubernetes endpoints controller)."""
    groups = _backends(service, pods)
    if groups is None:
        return None
    meta = service["metadata"]
    subsets = []
    for ports, members in sorted(groups.items()):
        subset = {}
        for key, ready in (("addresses", True), ("notReadyAddresses", False)):
            chosen = [_endpoint_address(p, service) for p in members if pod_is_ready(p) == ready]
            if chosen:
                subset[key] = chosen
        if ports:
            subset["ports"] = [{"name": n, "port": port, "protocol": proto} if n else {"port": port, "protocol": proto}
                               for n, port, proto in ports]
        subsets.append(subset)
    return {"apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                         "labels": {**(meta.get("labels") or {}), ENDPOINTS_MANAGED_BY: ENDPOINTS_MANAGER}},
            "subsets": subsets}


def _endpoint_address(pod: dict, service: dict) -> dict:
    hostname = _dns_hostname(pod, service)
    return {"ip": pod["status"]["podIP"], **({"hostname": hostname} if hostname else {}),
            "nodeName": pod["spec"].get("nodeName"),
            "targetRef": {"kind": "Pod", "namespace": pod["metadata"]["namespace"], "name": pod["metadata"]["name"],
                          "uid": pod["metadata"].get("uid")}}


def reconcile_endpoints(services: list[dict], pods: list[dict], endpoints: list[dict]) -> list[Action]:
    """Endpoints for every Service with a selector (taken over if someone else wrote them, as in
    Kubernetes); ours (labelled) go with their Service or its selector. The Endpoints of a Service
    without a selector are its user's: never touched."""
    existing = {key_of(e): e for e in endpoints}
    actions: list[Action] = []
    wanted = set()
    for service in services:
        want = endpoints_for(service, pods)
        if want is None:
            continue
        wanted.add(key_of(want))
        have = existing.get(key_of(want))
        if have is None:
            actions.append(create(want))
        elif (have.get("subsets") or []) != want["subsets"] or labels_of(have) != want["metadata"]["labels"]:
            actions.append(Action("patch", "Endpoints", *key_of(have),
                                  {"metadata": {"labels": _label_patch(labels_of(have), want["metadata"]["labels"])},
                                   "subsets": want["subsets"]}))
    actions += [delete("Endpoints", e) for k, e in sorted(existing.items())
                if k not in wanted and labels_of(e).get(ENDPOINTS_MANAGED_BY) == ENDPOINTS_MANAGER]
    return actions


def _label_patch(have: dict, want: dict) -> dict:
    """A merge patch from labels `have` to `want` (null removes)."""
    return {**{k: None for k in have if k not in want}, **want}


def mirrored_slices(services: list[dict], endpoints: list[dict]) -> list[dict]:
    """EndpointSlices for the Endpoints a user wrote for a Service without a selector: one per subset
    and address family, ready from addresses, not ready from notReadyAddresses."""
    by_key = {key_of(s): s for s in services}
    slices = []
    for eps in sorted(endpoints, key=key_of):
        service = by_key.get(key_of(eps))
        if (service is None or (service.get("spec") or {}).get("selector")
                or labels_of(eps).get(ENDPOINTS_MANAGED_BY) == ENDPOINTS_MANAGER
                or labels_of(eps).get(SKIP_MIRROR) == "true"):
            continue
        for index, subset in enumerate(eps.get("subsets") or []):
            entries = [(a, True) for a in subset.get("addresses") or []] + \
                      [(a, False) for a in subset.get("notReadyAddresses") or []]
            for family in ("IPv4", "IPv6"):
                chosen = [(a, r) for a, r in entries if (":" in str(a.get("ip", ""))) == (family == "IPv6")]
                if chosen:
                    slices.append(_mirrored_slice(service, subset.get("ports") or [], chosen, family, index))
    return slices


def _mirrored_slice(service: dict, ports: list, entries: list, family: str, index: int) -> dict:
    endpoints = [{"addresses": [a["ip"]], "conditions": {"ready": r, "serving": r, "terminating": False},
                  **({"nodeName": a["nodeName"]} if a.get("nodeName") else {}),
                  **({"targetRef": a["targetRef"]} if a.get("targetRef") else {})} for a, r in entries]
    return endpoint_slice(service, [index, family], MIRROR_MANAGER, family, endpoints,
                          [{"name": p.get("name", ""), "port": p.get("port"), "protocol": p.get("protocol", "TCP")}
                           for p in ports])


def reconcile_mirrored_slices(services: list[dict], endpoints: list[dict], slices: list[dict]) -> list[Action]:
    return _reconcile_slices(mirrored_slices(services, endpoints), slices, MIRROR_MANAGER)


# --------------------------------------------------------------------------------------------
# ServiceAccounts: every namespace has its "default" one (pods name it when they name none). They
# carry no tokens here: this API server authenticates no one.


def default_service_accounts(namespaces: list[dict], accounts: list[dict]) -> list[Action]:
    have = {key_of(a) for a in accounts}
    return [create({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": "default", "namespace": ns["metadata"]["name"]}})
            for ns in sorted(namespaces, key=lambda n: n["metadata"]["name"])
            if (ns["metadata"]["name"], "default") not in have and not is_terminating(ns)]


# --------------------------------------------------------------------------------------------
# Nodes: pod CIDRs and heartbeats


def allocate_pod_cidrs(nodes: list[dict], cluster_cidr: str, mask: int,
                       assigned: dict[str, str] | None = None) -> list[Action]:
    """A free pod CIDR for each node without one. `assigned`: {node name: CIDR} this controller has
    already given and the watch has not shown yet; those nodes are left alone and those CIDRs are
    taken (a second pass on a stale view would otherwise give one CIDR to two nodes)."""
    assigned = assigned or {}
    network = ipaddress.ip_network(cluster_cidr)
    used = {n["spec"].get("podCIDR") for n in nodes if n.get("spec", {}).get("podCIDR")} | set(assigned.values())
    free = (str(s) for s in network.subnets(new_prefix=mask) if str(s) not in used)
    actions = []
    for node in sorted(nodes, key=lambda n: n["metadata"].get("creationTimestamp", "") + n["metadata"]["name"]):
        if node.get("spec", {}).get("podCIDR") or node["metadata"]["name"] in assigned:
            continue
        cidr = next(free, None)
        if cidr is None:
            log.error("no free pod CIDR left in %s for node %s", cluster_cidr, node["metadata"]["name"])
            break
        actions.append(patch("Node", node, {"spec": {"podCIDR": cidr, "podCIDRs": [cidr]}}))
    return actions


def stale_nodes(nodes: list[dict], now: float) -> list[Action]:
    actions = []
    for node in nodes:
        conditions = node.get("status", {}).get("conditions") or []
        ready = next((c for c in conditions if c.get("type") == "Ready"), None)
        if not ready or ready.get("status") != "True":
            continue
        beat = _parse_time(ready.get("lastHeartbeatTime"))
        if beat is not None and now - beat > HEARTBEAT_GRACE_S:
            unknown = {**ready, "status": "Unknown", "reason": "NodeStatusUnknown",
                       "message": "the node agent stopped posting status"}
            rest = [c for c in conditions if c.get("type") != "Ready"]
            actions.append(patch("Node", node, {"status": {"conditions": rest + [unknown]}}, "status"))
    return actions


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Garbage collection


def orphans(objects: dict[str, list[dict]],
            owner_kinds=("Deployment", "ReplicaSet", "DaemonSet", "StatefulSet", "Job", "CronJob",
                         "Service")) -> list[Action]:
    """Objects whose every owner reference points at an owner that no longer exists."""
    alive = {o["metadata"].get("uid") for kind in owner_kinds for o in objects.get(kind, [])}
    actions = []
    for kind in ("ReplicaSet", "Pod", "EndpointSlice", "Job"):
        for obj in objects.get(kind, []):
            refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("kind") in owner_kinds]
            if refs and not any(r.get("uid") in alive for r in refs):
                actions.append(delete(kind, obj))
    return actions


# --------------------------------------------------------------------------------------------
# All controllers, one pass


@dataclass
class Settings:
    cluster_cidr: str = "10.244.0.0/16"
    node_cidr_mask: int = 24


def desired_actions(objects: dict[str, list[dict]], settings: Settings, now: float,
                    unsettled: frozenset = frozenset(), assigned_cidrs: dict[str, str] | None = None) -> list[Action]:
    """Every controller over the current objects.

    `unsettled`: uids of ReplicaSets whose earlier pod creations/deletions the watch has not shown
    yet; only their own scaling waits. They stay in `objects`, so their pods are not orphans and
    their Deployment still sees them. `assigned_cidrs`: see allocate_pod_cidrs."""
    actions: list[Action] = []
    for deploy in objects["Deployment"]:
        actions += reconcile_deployment(deploy, objects["ReplicaSet"])
    for rs in objects["ReplicaSet"]:
        if rs["metadata"].get("uid") not in unsettled:
            actions += reconcile_replicaset(rs, objects["Pod"])
    for ds in objects.get("DaemonSet", []):
        if ds["metadata"].get("uid") not in unsettled:
            actions += reconcile_daemonset(ds, objects["Node"], objects["Pod"])
    for sts in objects.get("StatefulSet", []):
        if sts["metadata"].get("uid") not in unsettled:
            actions += reconcile_statefulset(sts, objects["Pod"])
    for job in objects.get("Job", []):
        if job["metadata"].get("uid") not in unsettled:
            actions += reconcile_job(job, objects["Pod"], now)
    for cronjob in objects.get("CronJob", []):
        actions += reconcile_cronjob(cronjob, objects.get("Job", []), now)
    actions += reconcile_endpoint_slices(objects["Service"], objects["Pod"], objects["EndpointSlice"])
    actions += reconcile_endpoints(objects["Service"], objects["Pod"], objects.get("Endpoints", []))
    actions += reconcile_mirrored_slices(objects["Service"], objects.get("Endpoints", []), objects["EndpointSlice"])
    actions += default_service_accounts(objects.get("Namespace", []), objects.get("ServiceAccount", []))
    actions += allocate_pod_cidrs(objects["Node"], settings.cluster_cidr, settings.node_cidr_mask, assigned_cidrs)
    actions += stale_nodes(objects["Node"], now)
    actions += orphans(objects)
    return actions


class Expectations:
    """Pods this process created or deleted that the watch has not shown yet, per ReplicaSet.

    Without it, a second pass before the watch catches up would create (or delete) pods twice.
    """

    def __init__(self, ttl: float = 15.0):
        self.ttl = ttl
        self.pending: dict[str, tuple[set, set, float]] = {}

    def expect(self, owner_uid: str, adds: set, deletes: set, now: float) -> None:
        self.pending[owner_uid] = (adds, deletes, now + self.ttl)

    def satisfied(self, owner_uid: str, present: set, now: float) -> bool:
        entry = self.pending.get(owner_uid)
        if entry is None:
            return True
        adds, deletes, deadline = entry
        if (adds <= present and not (deletes & present)) or now > deadline:
            del self.pending[owner_uid]
            return True
        return False


KINDS = ("Deployment", "ReplicaSet", "DaemonSet", "StatefulSet", "Job", "CronJob", "Pod", "Service", "EndpointSlice", "Endpoints", "Node",
         "Namespace", "ServiceAccount")


class ControllerManager:
    def __init__(self, client, view, settings: Settings):
        from netplane.client import UnseenWrites   # the client (and aiohttp) only where it runs
        from netplane.events import EventRecorder
        self.client = client
        self.view = view
        self.settings = settings
        self.events = EventRecorder(client, "controller-manager")
        self.expectations = Expectations()
        self.assigned_cidrs = UnseenWrites(self.expectations.ttl)   # node name -> the podCIDR it was given

    def snapshot(self) -> dict[str, list[dict]]:
        return {kind: self.view.list(kind) for kind in KINDS}

    def unsettled_owners(self, objects: dict[str, list[dict]], now: float) -> frozenset:
        """Uids of the pods' owners (ReplicaSets, DaemonSets, StatefulSets, Jobs) whose earlier pod creations/deletions are not visible yet."""
        pods_by_owner: dict[str, set] = {}
        for pod in objects["Pod"]:
            for ref in pod["metadata"].get("ownerReferences") or []:
                pods_by_owner.setdefault(ref.get("uid"), set()).add(pod["metadata"]["name"])
        return frozenset(owner["metadata"]["uid"] for owner in [*objects["ReplicaSet"], *objects["DaemonSet"],
                                                     *objects["StatefulSet"], *objects["Job"]]
                         if not self.expectations.satisfied(owner["metadata"]["uid"],
                                                            pods_by_owner.get(owner["metadata"]["uid"], set()), now))

    async def sync(self) -> None:
        if not self.view.is_synced():
            return
        now = time.time()
        objects = self.snapshot()
        actions = desired_actions(objects, self.settings, now, self.unsettled_owners(objects, now),
                                  self.unseen_cidrs(objects["Node"], now))
        self.record_expectations(actions, objects, now)
        for action in actions:
            await self.apply(action)

    def unseen_cidrs(self, nodes: list[dict], now: float) -> dict[str, str]:
        """{node: CIDR} given by this process that the watch does not show yet."""
        return self.assigned_cidrs.unseen({n["metadata"]["name"]: [(n.get("spec") or {}).get("podCIDR")]
                                           for n in nodes}, now)

    def record_expectations(self, actions: list[Action], objects, now: float) -> None:
        for action in actions:
            cidr = (action.body or {}).get("spec", {}).get("podCIDR") if action.kind == "Node" else None
            if action.verb == "patch" and cidr:
                self.assigned_cidrs.note(action.name, cidr, now)
        by_owner: dict[str, tuple[set, set]] = {}
        for action in actions:
            if action.kind != "Pod" or action.verb not in ("create", "delete"):
                continue
            source = action.body if action.verb == "create" else next(
                (p for p in objects["Pod"] if key_of(p) == (action.namespace, action.name)), None)
            for ref in (source or {}).get("metadata", {}).get("ownerReferences") or []:
                adds, deletes = by_owner.setdefault(ref["uid"], (set(), set()))
                (adds if action.verb == "create" else deletes).add(action.name)
        for uid, (adds, deletes) in by_owner.items():
            self.expectations.expect(uid, adds, deletes, now)

    async def apply(self, action: Action) -> None:
        from netplane.client import APIError
        try:
            if action.verb == "create":
                await self.client.create(action.body)
            elif action.verb == "patch":
                await self.client.patch(action.kind, action.name, action.body, action.namespace or None,
                                        action.subresource)
            elif action.verb == "delete":
                await self.client.delete(action.kind, action.name, action.namespace or None)
            log.info(action.describe())
            if action.event:
                self.events.emit(*action.event)
        except APIError as err:
            if not (action.verb == "create" and err.status == 409) and err.status != 404:
                log.warning("%s failed: %s", action.describe(), err)


def main(argv: list[str]) -> int:
    from netplane import daemon
    from netplane.client import resolve_server, watch_and_sync

    parser = argparse.ArgumentParser(prog="netplane controller-manager")
    parser.add_argument("--server")
    parser.add_argument("--cluster-cidr", default="10.244.0.0/16")
    parser.add_argument("--node-cidr-mask-size", type=int, default=24)
    parser.add_argument("--health-listen")
    args = parser.parse_args(argv)
    daemon.setup_logging("controller-manager")
    settings = Settings(args.cluster_cidr, args.node_cidr_mask_size)

    async def run(stop: asyncio.Event) -> None:
        await watch_and_sync(resolve_server(args.server), KINDS,
                             lambda client, view: ControllerManager(client, view, settings).sync,
                             stop, min_interval=0.05, periodic=5.0)

    return daemon.run(run, "controller-manager", args.health_listen)
