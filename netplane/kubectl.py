"""`netplane apply`, `netplane delete`, `netplane get`: the few kubectl commands the lab needs.

    netplane apply -f examples/echo.yaml
    netplane get pods -o wide
    netplane get svc echo -o json
    netplane delete -f examples/echo.yaml

`apply` checks every document of a file first (parse, known kind, validation.validate on the
defaulted object) and sends nothing from a file with a bad document. Then each object is
created, or updated with a merge patch computed like kubectl's client-side apply (the
last-applied-configuration annotation tells which fields a later manifest dropped), or left
alone when the live object already says what the manifest says.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from netplane import kinds, objects, validation
from netplane.client import APIError, Client, resolve_server
from netplane.kinds import Kind

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
ALL = ("pods", "services", "deployments", "replicasets")  # what `get all` shows, as kubectl's category


# =============================================================================================
# Manifests: documents, checks (pure)
# =============================================================================================

@dataclass(frozen=True)
class Document:
    index: int    # 1-based position of the YAML document in the file
    obj: dict

    def describe(self, default_namespace: str = "default") -> str:
        """'Deployment default/echo' (the namespace only for namespaced kinds)."""
        kind = self.obj.get("kind", "?")
        name = objects.name_of(self.obj) or "<no name>"
        try:
            namespaced = kinds.by_kind(kind).namespaced
        except kinds.UnknownKind:
            namespaced = bool(objects.namespace_of(self.obj))
        if namespaced:
            return f"{kind} {objects.namespace_of(self.obj) or default_namespace}/{name}"
        return f"{kind} {name}"


def parse_manifest(text: str, source: str) -> list[Document]:
    """The documents of a multi-document YAML file, numbered as in the file (List items share
    their List's number). Raises objects.ManifestError for YAML that does not parse."""
    objects.load_documents(text, source)  # the shared checks: parses, mappings with apiVersion/kind
    documents = []
    for index, doc in enumerate(yaml.safe_load_all(text), start=1):
        if doc is None:
            continue
        if str(doc.get("kind", "")).endswith("List") and isinstance(doc.get("items"), list):
            documents.extend(Document(index, item) for item in doc["items"])
        else:
            documents.append(Document(index, doc))
    return documents


def check_documents(documents: list[Document], source: str, namespace: str | None,
                    validate: bool = True) -> list[str]:
    """Every problem in the documents, one line each:
    `FILE: document N (Kind ns/name): field: message`. validate=False checks only the kinds."""
    problems = []
    for doc in documents:
        where = f"{source}: document {doc.index} ({doc.describe(namespace or 'default')})"
        if not isinstance(doc.obj, dict):
            problems.append(f"{where}: expected a mapping with apiVersion and kind")
            continue
        try:
            kinds.of(doc.obj)
        except kinds.UnknownKind as err:
            problems.append(f"{where}: {err}")
            continue
        if not validate:
            continue
        obj_ns = objects.namespace_of(doc.obj)
        if namespace and obj_ns and obj_ns != namespace:
            problems.append(f"{where}: metadata.namespace: the namespace from the provided object "
                            f"{obj_ns!r} does not match the namespace {namespace!r} given with -n")
        for error in validation.validate(validation.default(doc.obj)):
            problems.append(f"{where}: {validation.format_error(error)}")
    return problems


def manifest_paths(path: str) -> list[str]:
    """A file, or the .yaml/.yml/.json files of a directory in name order (as kubectl -f DIR)."""
    if path != "-" and Path(path).is_dir():
        return [str(p) for p in sorted(Path(path).iterdir()) if p.suffix in (".yaml", ".yml", ".json")]
    return [path]


def load_and_check(path: str, namespace: str | None, validate: bool = True) -> tuple[list[Document], list[str]]:
    """Read and check a manifest file ("-" is stdin); returns (documents, problems)."""
    try:
        text = sys.stdin.read() if path == "-" else open(path).read()
    except OSError as err:
        return [], [f"{path}: cannot read: {err.strerror}"]
    try:
        documents = parse_manifest(text, path)
    except objects.ManifestError as err:
        return [], [str(err)]
    return documents, check_documents(documents, path, namespace, validate)


# =============================================================================================
# Apply: create, configure or leave unchanged (pure parts)
# =============================================================================================

def with_namespace(obj: dict, kind: Kind, namespace: str | None) -> dict:
    meta = dict(obj.get("metadata") or {})
    if kind.namespaced:
        meta["namespace"] = meta.get("namespace") or namespace or "default"
    else:
        meta.pop("namespace", None)
    return {**obj, "metadata": meta}


def last_applied_text(obj: dict) -> str:
    """The manifest as kubectl records it: the object without the annotation itself."""
    meta = dict(obj.get("metadata") or {})
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != LAST_APPLIED}
    if annotations:
        meta["annotations"] = annotations
    else:
        meta.pop("annotations", None)
    return json.dumps({**obj, "metadata": meta}, separators=(",", ":"), sort_keys=True)


def annotated(obj: dict) -> dict:
    meta = dict(obj.get("metadata") or {})
    meta["annotations"] = {**(meta.get("annotations") or {}), LAST_APPLIED: last_applied_text(obj)}
    return {**obj, "metadata": meta}


def removals(previous, wanted) -> dict:
    """A merge patch that nulls every field `previous` (last applied) set and `wanted` dropped."""
    patch = {}
    if not isinstance(previous, dict) or not isinstance(wanted, dict):
        return patch
    for key, old in previous.items():
        if key not in wanted:
            patch[key] = None
        elif isinstance(old, dict) and isinstance(wanted[key], dict):
            nested = removals(old, wanted[key])
            if nested:
                patch[key] = nested
    return patch


def _deep_merge(base: dict, extra: dict) -> dict:
    result = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _deep_merge(result[key], value)
        else:
            result[key] = value
    return result


def is_subset(wanted, live) -> bool:
    """Does `live` already say everything `wanted` says? (Fields only the server sets are ignored.)"""
    if isinstance(wanted, dict):
        return isinstance(live, dict) and all(is_subset(v, live.get(k)) for k, v in wanted.items())
    if isinstance(wanted, list):
        return isinstance(live, list) and len(wanted) == len(live) and \
            all(is_subset(w, v) for w, v in zip(wanted, live))
    return wanted == live


def apply_plan(obj: dict, live: dict | None) -> tuple[str, dict | None]:
    """("created", object to create) | ("configured", merge patch) | ("unchanged", None)."""
    desired = annotated(obj)
    if live is None:
        return "created", desired
    live_annotations = (live.get("metadata") or {}).get("annotations") or {}
    previous = json.loads(live_annotations.get(LAST_APPLIED) or "{}")
    dropped = removals(previous, obj)
    comparable = {k: v for k, v in validation.default(obj).items() if k not in ("status",)}
    comparable["metadata"] = {k: v for k, v in (obj.get("metadata") or {}).items()
                              if k in ("labels", "annotations")}
    if not dropped and is_subset(comparable, live) and \
            live_annotations.get(LAST_APPLIED) == last_applied_text(obj):
        return "unchanged", None
    patch = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind", "status")}
    patch["metadata"] = {k: v for k, v in desired["metadata"].items() if k in ("labels", "annotations")}
    return "configured", _deep_merge(patch, dropped)


def display_name(kind: Kind) -> str:
    """kubectl's resource/name prefix: 'deployment.apps', 'service'."""
    return f"{kind.singular}.{kind.group}" if kind.group else kind.singular


def resource_name(kind: Kind) -> str:
    return f"{kind.plural}.{kind.group}" if kind.group else kind.plural


def error_line(err: APIError, action: str = "", source: str = "") -> str:
    where = f"error when {action} \"{source}\": " if action else ""
    if err.reason:
        return f"Error from server ({err.reason}): {where}{err.message}"
    return f"error: {where}{err.message}"


# =============================================================================================
# Commands
# =============================================================================================

def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", "-s", help="API server URL (default: --kubeconfig, $KUBECONFIG, "
                        "$NETPLANE_SERVER, then the lab's kubeconfig)")
    parser.add_argument("--kubeconfig", help="kubeconfig file naming the server")


def _client(args) -> Client:
    return Client(resolve_server(args.server, args.kubeconfig))


def _run(coro) -> int:
    try:
        return asyncio.run(coro)
    except APIError as err:
        print(error_line(err), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def apply_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="netplane apply", description="create or update objects from manifests")
    parser.add_argument("-f", "--filename", action="append", required=True,
                        help="manifest file (multi-document YAML or JSON) or directory; '-' reads stdin; "
                        "repeatable")
    parser.add_argument("-n", "--namespace", help="namespace for objects that name none")
    _client_args(parser)
    args = parser.parse_args(argv)
    loaded, problems = [], []
    for path in [p for given in args.filename for p in manifest_paths(given)]:
        documents, file_problems = load_and_check(path, args.namespace)
        loaded.append((path, documents))
        problems += file_problems
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    return _run(_apply_all(args, loaded))


async def _apply_all(args, loaded: list[tuple[str, list[Document]]]) -> int:
    failed = False
    async with _client(args) as client:
        for path, documents in loaded:
            for doc in documents:
                kind = kinds.of(doc.obj)
                obj = with_namespace(doc.obj, kind, args.namespace)
                try:
                    outcome = await _apply_one(client, kind, obj)
                    print(f"{display_name(kind)}/{objects.name_of(obj)} {outcome}")
                except APIError as err:
                    print(error_line(err, "applying", path), file=sys.stderr)
                    failed = True
    return 1 if failed else 0


async def _apply_one(client: Client, kind: Kind, obj: dict) -> str:
    name, namespace = objects.name_of(obj), objects.namespace_of(obj) or None
    try:
        live = await client.get(kind, name, namespace)
    except APIError as err:
        if err.status != 404:
            raise
        live = None
    outcome, body = apply_plan(obj, live)
    if outcome == "created":
        await client.create(body)
    elif outcome == "configured":
        await client.patch(kind, name, body, namespace)
    return outcome


def delete_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="netplane delete",
                                     description="delete the objects a manifest names, or KIND NAME...")
    parser.add_argument("target", nargs="*", help="KIND NAME... (instead of -f)")
    parser.add_argument("-f", "--filename", action="append", help="manifest file or directory; repeatable")
    parser.add_argument("-n", "--namespace", help="namespace for objects that name none")
    _client_args(parser)
    args = parser.parse_args(argv)
    targets: list[tuple[Kind, str, str | None, str]] = []  # (kind, name, namespace, source)
    if args.filename:
        for path in [p for given in args.filename for p in manifest_paths(given)]:
            documents, problems = load_and_check(path, args.namespace, validate=False)
            if problems:
                for problem in problems:
                    print(f"error: {problem}", file=sys.stderr)
                return 1
            for doc in documents:
                kind = kinds.of(doc.obj)
                obj = with_namespace(doc.obj, kind, args.namespace)
                targets.append((kind, objects.name_of(obj), objects.namespace_of(obj) or None, path))
    elif len(args.target) >= 2:
        try:
            kind = kinds.lookup(args.target[0])
        except kinds.UnknownKind as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        namespace = (args.namespace or "default") if kind.namespaced else None
        targets = [(kind, name, namespace, "") for name in args.target[1:]]
    else:
        parser.error("give -f FILE, or KIND NAME...")
    return _run(_delete_all(args, targets))


async def _delete_all(args, targets) -> int:
    failed = False
    async with _client(args) as client:
        for kind, name, namespace, source in targets:
            try:
                result = await client.delete(kind, name, namespace)
            except APIError as err:
                print(error_line(err, "deleting", source) if source else error_line(err), file=sys.stderr)
                failed = True
                continue
            if result is None:  # already gone: reported, not fatal
                where = f'error when deleting "{source}": ' if source else ""
                print(f'Error from server (NotFound): {where}{resource_name(kind)} "{name}" not found',
                      file=sys.stderr)
            else:
                print(f'{display_name(kind)} "{name}" deleted')
    return 1 if failed else 0


# =============================================================================================
# get: tables like kubectl's
# =============================================================================================

def human_duration(seconds: float) -> str:
    """kubectl's AGE format (k8s.io/apimachinery duration.HumanDuration)."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y{days}d" if days else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def _since(timestamp: str | None, now: datetime) -> str:
    if not timestamp:
        return "<unknown>"
    try:
        then = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return "<unknown>"
    return human_duration((now - then).total_seconds())


def _age(obj: dict, now: datetime) -> str:
    return _since(obj.get("metadata", {}).get("creationTimestamp"), now)


def _join(values, empty: str = "<none>") -> str:
    values = [str(v) for v in values if v not in (None, "")]
    return ",".join(values) if values else empty


def _selector_text(selector: dict | None) -> str:
    return _join(f"{k}={v}" for k, v in sorted((selector or {}).items()))


def _pod_status(pod: dict) -> str:
    """kubectl's STATUS column, simplified: the waiting/terminated reason wins over the phase."""
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return "Terminating"
    status = pod.get("status") or {}
    reason = status.get("reason") or status.get("phase") or "Unknown"
    for container in reversed(status.get("containerStatuses") or []):
        state = container.get("state") or {}
        if (state.get("waiting") or {}).get("reason"):
            reason = state["waiting"]["reason"]
        elif state.get("terminated"):
            terminated = state["terminated"]
            reason = terminated.get("reason") or (f"Signal:{terminated['signal']}" if terminated.get("signal")
                                                  else f"ExitCode:{terminated.get('exitCode', 0)}")
    return reason


def _pod_restarts(pod: dict, now: datetime) -> str:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    count = sum(int(c.get("restartCount") or 0) for c in statuses)
    finished = [((c.get("lastState") or {}).get("terminated") or {}).get("finishedAt") for c in statuses]
    finished = sorted(f for f in finished if f)
    if count and finished:
        return f"{count} ({_since(finished[-1], now)} ago)"
    return str(count)


def _pod_ready(pod: dict) -> str:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    total = len((pod.get("spec") or {}).get("containers") or [])
    return f"{sum(1 for c in statuses if c.get('ready'))}/{total}"


def _service_ports(svc: dict) -> str:
    ports = []
    for port in (svc.get("spec") or {}).get("ports") or []:
        node = f":{port['nodePort']}" if port.get("nodePort") else ""
        ports.append(f"{port.get('port')}{node}/{port.get('protocol', 'TCP')}")
    return _join(ports)


def _service_external(svc: dict) -> str:
    spec = svc.get("spec") or {}
    kind = spec.get("type", "ClusterIP")
    if kind == "ExternalName":
        return spec.get("externalName") or "<none>"
    external = list(spec.get("externalIPs") or [])
    if kind == "LoadBalancer":
        ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        external += [i.get("ip") or i.get("hostname") for i in ingress]
        return _join(external, "<pending>")
    return _join(external)


def _node_status(node: dict) -> str:
    conditions = {c.get("type"): c.get("status") for c in (node.get("status") or {}).get("conditions") or []}
    status = {"True": "Ready", None: "Unknown"}.get(conditions.get("Ready"), "NotReady")
    if (node.get("spec") or {}).get("unschedulable"):
        status += ",SchedulingDisabled"
    return status


def _node_roles(node: dict) -> str:
    prefix = "node-role.kubernetes.io/"
    return _join(sorted(k[len(prefix):] for k in objects.labels_of(node) if k.startswith(prefix)))


def _node_address(node: dict, kind: str) -> str:
    return _join(a.get("address") for a in (node.get("status") or {}).get("addresses") or [] if a.get("type") == kind)


def _template_containers(obj: dict) -> list[dict]:
    return ((((obj.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers")) or []


def _slice_ports(eps: dict) -> str:
    ports = [str(p["port"]) for p in eps.get("ports") or [] if p.get("port") is not None]
    return ",".join(ports) if ports else "<unset>"


def _slice_endpoints(eps: dict) -> str:
    addresses = [a for e in eps.get("endpoints") or [] for a in e.get("addresses") or []]
    if not addresses:
        return "<none>"
    shown = ",".join(addresses[:3])
    return f"{shown} + {len(addresses) - 3} more..." if len(addresses) > 3 else shown


def _endpoints_text(eps: dict) -> str:
    """ip:port for each address and port of each subset, three at most, as kubectl prints Endpoints."""
    pairs = [f"{a.get('ip')}:{p.get('port')}" if subset.get("ports") else str(a.get("ip"))
             for subset in eps.get("subsets") or [] for p in (subset.get("ports") or [{}])
             for a in subset.get("addresses") or []]
    if not pairs:
        return "<none>"
    shown = ",".join(pairs[:3])
    return f"{shown} + {len(pairs) - 3} more..." if len(pairs) > 3 else shown


def _job_status(job: dict) -> str:
    conditions = {c.get("type") for c in _status(job, "conditions", default=[]) if c.get("status") == "True"}
    for kind in ("Complete", "Failed", "Suspended"):
        if kind in conditions:
            return kind
    return "Suspended" if (job.get("spec") or {}).get("suspend") else "Running"


def _job_completions(job: dict) -> str:
    spec = job.get("spec") or {}
    if spec.get("completions") is None:   # a work queue
        return f"{_status(job, 'succeeded')}/1 of {spec.get('parallelism', 1)}"
    return f"{_status(job, 'succeeded')}/{spec['completions']}"


def _job_duration(job: dict, now: datetime) -> str:
    start = _status(job, "startTime", default="")
    if not start:
        return ""
    end = _status(job, "completionTime", default="")
    try:
        then = datetime.strptime(end, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc) if end else now
    except ValueError:
        then = now
    return _since(start, then)


def _ingress_address(ing: dict) -> str:
    ingress = ((ing.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    return _join((i.get("ip") or i.get("hostname") for i in ingress), "")


def _event_object(event: dict) -> str:
    ref = event.get("involvedObject") or {}
    return f"{str(ref.get('kind', '')).lower()}/{ref.get('name', '')}"


def _event_last_seen(event: dict, now: datetime) -> str:
    return _since(event.get("lastTimestamp") or event.get("eventTime")
                  or (event.get("metadata") or {}).get("creationTimestamp"), now)


def _status(obj: dict, *path, default=0):
    value = obj.get("status") or {}
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return default if value is None else value


# Kinds whose table has its own NAME column (not the first one).
NAME_NOT_FIRST = frozenset(["Event"])
# kind -> [(header, cell(obj, now), wide-only)]
Column = tuple[str, object, bool]
COLUMNS: dict[str, list[Column]] = {
    "Pod": [
        ("READY", lambda o, n: _pod_ready(o), False),
        ("STATUS", lambda o, n: _pod_status(o), False),
        ("RESTARTS", lambda o, n: _pod_restarts(o, n), False),
        ("AGE", _age, False),
        ("IP", lambda o, n: _status(o, "podIP", default="<none>"), True),
        ("NODE", lambda o, n: (o.get("spec") or {}).get("nodeName") or "<none>", True),
        ("NOMINATED NODE", lambda o, n: _status(o, "nominatedNodeName", default="<none>"), True),
        ("READINESS GATES", lambda o, n: "<none>", True),
    ],
    "Service": [
        ("TYPE", lambda o, n: (o.get("spec") or {}).get("type", "ClusterIP"), False),
        ("CLUSTER-IP", lambda o, n: (o.get("spec") or {}).get("clusterIP") or "<none>", False),
        ("EXTERNAL-IP", lambda o, n: _service_external(o), False),
        ("PORT(S)", lambda o, n: _service_ports(o), False),
        ("AGE", _age, False),
        ("SELECTOR", lambda o, n: _selector_text((o.get("spec") or {}).get("selector")), True),
    ],
    "Deployment": [
        ("READY", lambda o, n: f"{_status(o, 'readyReplicas')}/{(o.get('spec') or {}).get('replicas', 0)}", False),
        ("UP-TO-DATE", lambda o, n: str(_status(o, "updatedReplicas")), False),
        ("AVAILABLE", lambda o, n: str(_status(o, "availableReplicas")), False),
        ("AGE", _age, False),
        ("CONTAINERS", lambda o, n: _join(c.get("name") for c in _template_containers(o)), True),
        ("IMAGES", lambda o, n: _join(c.get("image") for c in _template_containers(o)), True),
        ("SELECTOR", lambda o, n: _selector_text(((o.get("spec") or {}).get("selector") or {}).get("matchLabels")), True),
    ],
    "ReplicaSet": [
        ("DESIRED", lambda o, n: str((o.get("spec") or {}).get("replicas", 0)), False),
        ("CURRENT", lambda o, n: str(_status(o, "replicas")), False),
        ("READY", lambda o, n: str(_status(o, "readyReplicas")), False),
        ("AGE", _age, False),
        ("CONTAINERS", lambda o, n: _join(c.get("name") for c in _template_containers(o)), True),
        ("IMAGES", lambda o, n: _join(c.get("image") for c in _template_containers(o)), True),
        ("SELECTOR", lambda o, n: _selector_text(((o.get("spec") or {}).get("selector") or {}).get("matchLabels")), True),
    ],
    "DaemonSet": [
        ("DESIRED", lambda o, n: str(_status(o, "desiredNumberScheduled")), False),
        ("CURRENT", lambda o, n: str(_status(o, "currentNumberScheduled")), False),
        ("READY", lambda o, n: str(_status(o, "numberReady")), False),
        ("UP-TO-DATE", lambda o, n: str(_status(o, "updatedNumberScheduled")), False),
        ("AVAILABLE", lambda o, n: str(_status(o, "numberAvailable")), False),
        ("NODE SELECTOR", lambda o, n: _selector_text(((o.get("spec") or {}).get("template") or {}).get(
            "spec", {}).get("nodeSelector")), False),
        ("AGE", _age, False),
        ("CONTAINERS", lambda o, n: _join(c.get("name") for c in _template_containers(o)), True),
        ("IMAGES", lambda o, n: _join(c.get("image") for c in _template_containers(o)), True),
        ("SELECTOR", lambda o, n: _selector_text(((o.get("spec") or {}).get("selector") or {}).get("matchLabels")), True),
    ],
    "StatefulSet": [
        ("READY", lambda o, n: f"{_status(o, 'readyReplicas')}/{(o.get('spec') or {}).get('replicas', 1)}", False),
        ("AGE", _age, False),
        ("CONTAINERS", lambda o, n: _join(c.get("name") for c in _template_containers(o)), True),
        ("IMAGES", lambda o, n: _join(c.get("image") for c in _template_containers(o)), True),
    ],
    "CronJob": [
        ("SCHEDULE", lambda o, n: (o.get("spec") or {}).get("schedule", ""), False),
        ("TIMEZONE", lambda o, n: (o.get("spec") or {}).get("timeZone") or "<none>", False),
        ("SUSPEND", lambda o, n: str(bool((o.get("spec") or {}).get("suspend"))), False),
        ("ACTIVE", lambda o, n: str(len(_status(o, "active", default=[]))), False),
        ("LAST SCHEDULE", lambda o, n: _since(_status(o, "lastScheduleTime", default=""), n)
         if _status(o, "lastScheduleTime", default="") else "<none>", False),
        ("AGE", _age, False),
    ],
    "Job": [
        ("STATUS", lambda o, n: _job_status(o), False),
        ("COMPLETIONS", lambda o, n: _job_completions(o), False),
        ("DURATION", lambda o, n: _job_duration(o, n), False),
        ("AGE", _age, False),
        ("CONTAINERS", lambda o, n: _join(c.get("name") for c in _template_containers(o)), True),
        ("IMAGES", lambda o, n: _join(c.get("image") for c in _template_containers(o)), True),
        ("SELECTOR", lambda o, n: _selector_text(((o.get("spec") or {}).get("selector") or {}).get("matchLabels")), True),
    ],
    "Node": [
        ("STATUS", lambda o, n: _node_status(o), False),
        ("ROLES", lambda o, n: _node_roles(o), False),
        ("AGE", _age, False),
        ("VERSION", lambda o, n: _status(o, "nodeInfo", "kubeletVersion", default=""), False),
        ("INTERNAL-IP", lambda o, n: _node_address(o, "InternalIP"), True),
        ("EXTERNAL-IP", lambda o, n: _node_address(o, "ExternalIP"), True),
        ("OS-IMAGE", lambda o, n: _status(o, "nodeInfo", "osImage", default="<unknown>"), True),
        ("KERNEL-VERSION", lambda o, n: _status(o, "nodeInfo", "kernelVersion", default="<unknown>"), True),
        ("CONTAINER-RUNTIME", lambda o, n: _status(o, "nodeInfo", "containerRuntimeVersion", default="<unknown>"), True),
    ],
    "Namespace": [
        ("STATUS", lambda o, n: _status(o, "phase", default="Active"), False),
        ("AGE", _age, False),
    ],
    "Endpoints": [
        ("ENDPOINTS", lambda o, n: _endpoints_text(o), False),
        ("AGE", _age, False),
    ],
    "EndpointSlice": [
        ("ADDRESSTYPE", lambda o, n: o.get("addressType", ""), False),
        ("PORTS", lambda o, n: _slice_ports(o), False),
        ("ENDPOINTS", lambda o, n: _slice_endpoints(o), False),
        ("AGE", _age, False),
    ],
    "Ingress": [
        ("CLASS", lambda o, n: (o.get("spec") or {}).get("ingressClassName") or "<none>", False),
        ("HOSTS", lambda o, n: _join((r.get("host") for r in (o.get("spec") or {}).get("rules") or []), "*"), False),
        ("ADDRESS", lambda o, n: _ingress_address(o), False),
        ("PORTS", lambda o, n: "80, 443" if (o.get("spec") or {}).get("tls") else "80", False),
        ("AGE", _age, False),
    ],
    "Secret": [
        ("TYPE", lambda o, n: o.get("type", "Opaque"), False),
        ("DATA", lambda o, n: str(len(o.get("data") or {}) + len(o.get("stringData") or {})), False),
        ("AGE", _age, False),
    ],
    "ServiceAccount": [
        ("SECRETS", lambda o, n: str(len(o.get("secrets") or [])), False),
        ("AGE", _age, False),
    ],
    "ConfigMap": [
        ("DATA", lambda o, n: str(len(o.get("data") or {}) + len(o.get("binaryData") or {})), False),
        ("AGE", _age, False),
    ],
    # As kube-apiserver prints events: no NAME first (it comes last, with -o wide).
    "Event": [
        ("LAST SEEN", _event_last_seen, False),
        ("TYPE", lambda o, n: o.get("type", ""), False),
        ("REASON", lambda o, n: o.get("reason", ""), False),
        ("OBJECT", lambda o, n: _event_object(o), False),
        ("SUBOBJECT", lambda o, n: (o.get("involvedObject") or {}).get("fieldPath", ""), True),
        ("SOURCE", lambda o, n: ", ".join(filter(None, [(o.get("source") or {}).get("component"),
                                                        (o.get("source") or {}).get("host")])), True),
        ("MESSAGE", lambda o, n: o.get("message", ""), False),
        ("FIRST SEEN", lambda o, n: _since(o.get("firstTimestamp"), n), True),
        ("COUNT", lambda o, n: str(o.get("count", 1)), True),
        ("NAME", lambda o, n: objects.name_of(o), True),
    ],
    "IngressClass": [
        ("CONTROLLER", lambda o, n: (o.get("spec") or {}).get("controller", ""), False),
        ("PARAMETERS", lambda o, n: "<none>", False),
        ("AGE", _age, False),
    ],
}


def table_rows(kind: Kind, items: list[dict], wide: bool, all_namespaces: bool,
               now: datetime, kind_prefix: bool = False) -> list[list[str]]:
    """Header row and one row per object, as kubectl prints them (names as kind/name when
    several kinds are shown together)."""
    columns = [c for c in COLUMNS.get(kind.kind, [("AGE", _age, False)]) if wide or not c[2]]
    with_ns = all_namespaces and kind.namespaced
    named = kind.kind not in NAME_NOT_FIRST
    header = (["NAMESPACE"] if with_ns else []) + (["NAME"] if named else []) + [c[0] for c in columns]
    rows = [header]
    for obj in items:
        row = [objects.namespace_of(obj)] if with_ns else []
        prefix = f"{display_name(kind)}/" if kind_prefix else ""
        if named:
            row.append(prefix + objects.name_of(obj))
        row += [str(cell(obj, now)) for _, cell, _ in columns]
        rows.append(row)
    return rows


def table_columns(kind: Kind) -> list[dict]:
    """meta.k8s.io Table columnDefinitions for `kind` (priority 1: only with -o wide)."""
    columns = [] if kind.kind in NAME_NOT_FIRST else [
        {"name": "NAME", "type": "string", "format": "name", "priority": 0,
         "description": "Name must be unique within a namespace."}]
    for header, _, wide in COLUMNS.get(kind.kind, [("AGE", _age, False)]):
        columns.append({"name": header, "type": "string", "format": "", "priority": 1 if wide else 0,
                        "description": header.lower()})
    return columns


def table_cells(kind: Kind, obj: dict, now: datetime) -> list[str]:
    """One Table row's cells, in table_columns order."""
    first = [] if kind.kind in NAME_NOT_FIRST else [objects.name_of(obj)]
    return first + [str(cell(obj, now)) for _, cell, _ in COLUMNS.get(kind.kind, [("AGE", _age, False)])]


def format_table(rows: list[list[str]]) -> str:
    """Go's tabwriter as kubectl sets it up: min width 6, padding 3, last column unpadded."""
    widths = [max(6, max(len(r[i]) for r in rows) + 3) for i in range(len(rows[0]) - 1)]
    lines = ["".join(cell.ljust(w) for cell, w in zip(row, widths)) + row[-1] for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def go_json(obj) -> str:
    """JSON the way kubectl prints it: 4-space indent, sorted keys, <>& escaped."""
    text = json.dumps(obj, indent=4, sort_keys=True, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def as_list(items: list[dict]) -> dict:
    return {"apiVersion": "v1", "items": items, "kind": "List", "metadata": {"resourceVersion": ""}}


def render(kind: Kind, items: list[dict], output: str | None, single: bool, all_namespaces: bool,
           now: datetime | None = None) -> str:
    """The text `netplane get` prints for objects of one kind."""
    return render_groups([(kind, items)], output, single, all_namespaces, now)


def render_groups(groups: list[tuple[Kind, list[dict]]], output: str | None, single: bool,
                  all_namespaces: bool, now: datetime | None = None) -> str:
    """The text `netplane get` prints for objects of one or more kinds (`get svc,pods`)."""
    now = now or datetime.now(timezone.utc)
    for kind, items in groups:
        for item in items:
            item.setdefault("apiVersion", kind.api_version)
            item.setdefault("kind", kind.kind)
    everything = [item for _, items in groups for item in items]
    document = everything[0] if single and len(everything) == 1 else as_list(everything)
    if output == "json":
        return go_json(document)
    if output == "yaml":
        return yaml.safe_dump(document, sort_keys=True, default_flow_style=False).rstrip("\n")
    if output == "name":
        return "\n".join(f"{display_name(kind)}/{objects.name_of(o)}" for kind, items in groups for o in items)
    several = len(groups) > 1
    tables = [format_table(table_rows(kind, items, output == "wide", all_namespaces, now, several))
              for kind, items in groups if items]
    return "\n\n".join(tables)


def get_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="netplane get", description="list or show objects")
    parser.add_argument("kind", help="pods, svc, deployments, nodes, endpointslices, ingresses, ...; "
                        "several as svc,pods; 'all'; KIND/NAME also works")
    parser.add_argument("names", nargs="*", help="object names (default: all)")
    parser.add_argument("-n", "--namespace", help="namespace (default: default)")
    parser.add_argument("-A", "--all-namespaces", action="store_true", help="list across all namespaces")
    parser.add_argument("-l", "--selector", help="label selector, e.g. app=echo,tier!=db")
    parser.add_argument("--field-selector", help="field selector, e.g. spec.nodeName=worker-1")
    parser.add_argument("-o", "--output", choices=["json", "yaml", "wide", "name"], help="output format")
    _client_args(parser)
    args = parser.parse_args(argv)
    kind_text, names = args.kind, list(args.names)
    if "/" in kind_text:
        kind_text, first = kind_text.split("/", 1)
        names.insert(0, first)
    wanted = [k for part in kind_text.split(",") for k in (ALL if part == "all" else (part,))]
    try:
        selected = list(dict.fromkeys(kinds.lookup(k) for k in wanted))
    except kinds.UnknownKind as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if names and len(selected) > 1:
        print("error: names can only be given with a single resource type", file=sys.stderr)
        return 1
    return _run(_get(args, selected, names))


async def _get(args, selected: list[Kind], names: list[str]) -> int:
    failed = False
    groups = []
    async with _client(args) as client:
        for kind in selected:
            namespace = _namespace_for(kind, args, names)
            if names:
                items = []
                for name in names:
                    try:
                        items.append(await client.get(kind, name, namespace))
                    except APIError as err:
                        print(error_line(err), file=sys.stderr)
                        failed = True
            else:
                items = (await client.list(kind, namespace, args.selector, args.field_selector)).get("items") or []
            groups.append((kind, items))
    if not any(items for _, items in groups):
        if not names:
            if args.output in ("json", "yaml"):
                print(render_groups(groups, args.output, False, args.all_namespaces))
            else:
                namespaced = any(k.namespaced for k in selected) and not args.all_namespaces
                where = f" in {args.namespace or 'default'} namespace" if namespaced else ""
                print(f"No resources found{where}.", file=sys.stderr)
        return 1 if failed else 0
    print(render_groups(groups, args.output, single=len(names) == 1, all_namespaces=args.all_namespaces))
    return 1 if failed else 0


def _namespace_for(kind: Kind, args, names: list[str]) -> str | None:
    if not kind.namespaced or (args.all_namespaces and not names):
        return None
    return args.namespace or "default"
