"""`netplane apiserver`: the Kubernetes REST API over the revisioned store, on aiohttp.

    netplane apiserver --listen 192.168.56.10:6443 --db /var/lib/netplane/apiserver.db

Three layers, top to bottom:
- pure helpers: selectors, the three patch formats, discovery documents, metav1.Status errors;
- Registry: object semantics over the store (server-set metadata, defaulting and validation,
  ClusterIP/NodePort allocation, status and scale subresources, binding, cascading delete,
  watch translation) with no HTTP in it;
- APIServer: routing of the Kubernetes paths onto the Registry, watch streaming, discovery,
  /healthz, /readyz, /metrics.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import json
import logging
import random
import re
import socket
import time
import uuid
from datetime import datetime, timezone
from typing import AsyncIterator, Callable

import aiohttp
import yaml
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from netplane import apiproxy, daemon, events, kinds, podexec, podlogs, podmetrics, portforward, validation
from netplane import store as store_mod
from netplane.allocators import AllocationError, Allocators
from netplane.kinds import KINDS, Kind

log = logging.getLogger("apiserver")

SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "netplane-system")
UNDELETABLE_NAMESPACES = ("default", "kube-system", "kube-public")
KUBERNETES_SERVICE_IP = "10.96.0.1"
# minor 31: kubectl dispatchers pick a kubectl that sends JSON bodies (>= 1.32 sends protobuf).
VERSION = {"major": "1", "minor": "31", "gitVersion": "v1.31.0-netplane", "gitCommit": "netplane",
           "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "python3",
           "compiler": "cpython", "platform": "linux/amd64"}
# Kinds whose status is written only through /status (a main-resource write keeps the old one).
STATUS_SUBRESOURCE = {"Pod", "Service", "Node", "Namespace", "Deployment", "ReplicaSet", "DaemonSet", "StatefulSet", "Job",
                      "CronJob", "Ingress"}
SCALE_SUBRESOURCE = {"Deployment", "ReplicaSet", "StatefulSet"}
CATEGORY_ALL = {"Pod", "Service", "Deployment", "ReplicaSet", "DaemonSet", "StatefulSet", "Job", "CronJob"}
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
BOOKMARK_INTERVAL = 30.0
VERB = web.RequestKey("verb", str)          # for metrics and logs
RESOURCE = web.RequestKey("resource", str)

REQUESTS = Counter("netplane_apiserver_requests_total", "API requests by verb, resource and code",
                   ["verb", "resource", "code"])
LATENCY = Histogram("netplane_apiserver_request_duration_seconds", "API request latency (watches excluded)",
                    ["verb", "resource"])
WATCHERS = Gauge("netplane_apiserver_watchers", "open watch streams", ["resource"])


# =============================================================================================
# Errors: metav1.Status
# =============================================================================================

class APIStatus(Exception):
    """An error answer: a metav1.Status with HTTP code = code."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


def resource_name(kind: Kind) -> str:
    """How Kubernetes names a resource in messages: "pods", "deployments.apps"."""
    return f"{kind.plural}.{kind.group}" if kind.group else kind.plural


def _details(kind: Kind, name: str) -> dict:
    return {"name": name, "group": kind.group, "kind": kind.plural}


def not_found(kind: Kind, name: str) -> APIStatus:
    return APIStatus(404, "NotFound", f'{resource_name(kind)} "{name}" not found', _details(kind, name))


def path_not_found() -> APIStatus:
    return APIStatus(404, "NotFound", "the server could not find the requested resource")


def already_exists(kind: Kind, name: str) -> APIStatus:
    return APIStatus(409, "AlreadyExists", f'{resource_name(kind)} "{name}" already exists',
                     _details(kind, name))


def conflict(kind: Kind, name: str, why: str = "the object has been modified; please apply your "
             "changes to the latest version and try again") -> APIStatus:
    return APIStatus(409, "Conflict", f'Operation cannot be fulfilled on {resource_name(kind)} "{name}": {why}',
                     _details(kind, name))


def invalid(kind: Kind, name: str, errors: list[tuple[str, str]]) -> APIStatus:
    """422 Invalid, kubectl's shape: one cause per field, the message naming each field."""
    qualified = f"{kind.kind}.{kind.group}" if kind.group else kind.kind
    causes = [{"reason": _cause_reason(msg), "message": msg, "field": field} for field, msg in errors]
    text = ", ".join(validation.format_error(e) for e in errors)
    listed = text if len(errors) == 1 else f"[{text}]"
    return APIStatus(422, "Invalid", f'{qualified} "{name}" is invalid: {listed}',
                     {"name": name, "group": kind.group, "kind": kind.kind, "causes": causes})


def _cause_reason(message: str) -> str:
    for prefix, reason in (("Required", "FieldValueRequired"), ("Duplicate", "FieldValueDuplicate"),
                           ("Unsupported", "FieldValueNotSupported")):
        if message.startswith(prefix):
            return reason
    return "FieldValueInvalid"


_STATUS_REASONS = {400: "BadRequest", 404: "NotFound", 500: "InternalError", 503: "ServiceUnavailable"}


async def _relay(one, other) -> None:
    """Copy WebSocket messages both ways until either side closes; then close both."""
    async def pump(source, sink):
        async for message in source:
            if message.type == aiohttp.WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            elif message.type == aiohttp.WSMsgType.TEXT:
                await sink.send_str(message.data)
    pumps = [asyncio.ensure_future(pump(one, other)), asyncio.ensure_future(pump(other, one))]
    await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    for task in pumps:
        task.cancel()
    await asyncio.gather(*pumps, return_exceptions=True)
    await asyncio.gather(one.close(), other.close(), return_exceptions=True)


async def _relay_to_agent(request: web.Request, url: str, node_name: str, protocol: str,
                          params=None) -> web.WebSocketResponse:
    """Open the same WebSocket to the agent (a refusal comes back as the API's Status, before the
    client's upgrade is answered), then answer the client with `protocol` and relay both ways."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)) as session:
        try:
            agent = await session.ws_connect(url, protocols=[protocol], params=params)
        except aiohttp.WSServerHandshakeError as err:
            raise APIStatus(err.status, _STATUS_REASONS.get(err.status, "InternalError"),
                            f"the agent on {node_name} refused: {err.message}") from None
        except aiohttp.ClientError as err:
            raise APIStatus(500, "InternalError", f'Get "{url}": {err}') from None
        client = web.WebSocketResponse(protocols=[protocol])
        await client.prepare(request)
        await _relay(client, agent)
        return client


def _refused(err: podlogs.LogError) -> APIStatus:
    """An agent-side refusal (logs, exec, attach) as the API's Status."""
    return APIStatus(err.status, _STATUS_REASONS.get(err.status, "BadRequest"), err.message)


def bad_request(message: str) -> APIStatus:
    return APIStatus(400, "BadRequest", message)


def expired(message: str) -> APIStatus:
    return APIStatus(410, "Expired", message)


# =============================================================================================
# Selectors (pure)
# =============================================================================================

_SET_TERM = re.compile(r"^\s*([^\s!=()]+)\s+(in|notin)\s+\((.*)\)\s*$")
_EXISTS_TERM = re.compile(r"^\s*(!?)\s*([^\s!=(),]+)\s*$")
_EQ_TERM = re.compile(r"^\s*([^\s!=()]+)\s*(==|=|!=)\s*([^\s!=(),]*)\s*$")
_FIELD_TERM = re.compile(r"^\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*$")


def _split_terms(text: str) -> list[str]:
    """Split on commas that are not inside parentheses ("a in (x,y),b" -> two terms)."""
    terms, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [t for t in terms if t.strip()]


def parse_label_selector(text: str | None) -> list[tuple[str, str, tuple[str, ...]]]:
    """'app=web,tier!=db,env in (a,b),x,!y' -> [(key, op, values)]; op: = != in notin exists !exists."""
    requirements = []
    for term in _split_terms(text or ""):
        if m := _SET_TERM.match(term):
            values = tuple(v.strip() for v in m.group(3).split(",") if v.strip())
            requirements.append((m.group(1), m.group(2), values))
        elif m := _EQ_TERM.match(term):
            requirements.append((m.group(1), "!=" if m.group(2) == "!=" else "=", (m.group(3),)))
        elif m := _EXISTS_TERM.match(term):
            requirements.append((m.group(2), "!exists" if m.group(1) else "exists", ()))
        else:
            raise bad_request(f"unable to parse requirement: {term.strip()!r} in labelSelector {text!r}")
    return requirements


def labels_match(requirements, labels: dict) -> bool:
    for key, op, values in requirements:
        present = key in labels
        value = labels.get(key)
        if op == "=":
            ok = present and value == values[0]
        elif op == "!=":
            ok = not present or value != values[0]
        elif op == "in":
            ok = present and value in values
        elif op == "notin":
            ok = not present or value not in values
        else:
            ok = present == (op == "exists")
        if not ok:
            return False
    return True


def parse_field_selector(text: str | None) -> list[tuple[str, str, str]]:
    """'metadata.name=x,status.phase!=Running' -> [(path, op, value)]; any dotted path works."""
    requirements = []
    for term in _split_terms(text or ""):
        m = _FIELD_TERM.match(term)
        if not m:
            raise bad_request(f"invalid field selector: {term.strip()!r}")
        requirements.append((m.group(1), "!=" if m.group(2) == "!=" else "=", m.group(3)))
    return requirements


def field_value(obj: dict, path: str) -> str:
    value = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def fields_match(requirements, obj: dict) -> bool:
    return all((field_value(obj, path) == value) == (op == "=") for path, op, value in requirements)


class Selector:
    """A list/watch filter: labelSelector and fieldSelector together (400 if they do not parse)."""

    def __init__(self, label_selector: str | None = None, field_selector: str | None = None):
        self.labels = parse_label_selector(label_selector)
        self.fields = parse_field_selector(field_selector)

    def __call__(self, obj: dict) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return labels_match(self.labels, labels) and fields_match(self.fields, obj)


# =============================================================================================
# Patches (pure)
# =============================================================================================

def merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f"json patch: path {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _patch_failed(message: str) -> APIStatus:
    return APIStatus(422, "Invalid", f"json patch: {message}")


def _walk(doc, parts: list[str], path: str):
    for part in parts:
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            raise _patch_failed(f"path {path!r} does not exist")
    return doc


def _json_patch_add(doc, parts: list[str], value, path: str):
    if not parts:
        return value
    parent = _walk(doc, parts[:-1], path)
    last = parts[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last) if last.isdigit() else -1
        if not 0 <= index <= len(parent):
            raise _patch_failed(f"index {last!r} out of range at {path!r}")
        parent.insert(index, value)
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise _patch_failed(f"cannot add at {path!r}")
    return doc


def _json_patch_remove(doc, parts: list[str], path: str):
    if not parts:
        raise _patch_failed("cannot remove the whole document")
    parent = _walk(doc, parts[:-1], path)
    _walk(parent, parts[-1:], path)  # must exist
    parent.pop(int(parts[-1]) if isinstance(parent, list) else parts[-1])
    return doc


def json_patch(target, operations) -> dict:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test."""
    doc = copy.deepcopy(target)
    if not isinstance(operations, list):
        raise bad_request("json patch: the body must be a list of operations")
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise bad_request(f"json patch: each operation needs op and path: {op!r}")
        path, verb = op["path"], op["op"]
        parts = _pointer(path)
        if verb == "add":
            doc = _json_patch_add(doc, parts, copy.deepcopy(op.get("value")), path)
        elif verb == "remove":
            doc = _json_patch_remove(doc, parts, path)
        elif verb == "replace":
            doc = _json_patch_remove(doc, parts, path) if parts else doc
            doc = _json_patch_add(doc, parts, copy.deepcopy(op.get("value")), path)
        elif verb in ("move", "copy"):
            source = _pointer(op.get("from", ""))
            value = copy.deepcopy(_walk(doc, source, op.get("from", "")))
            if verb == "move":
                doc = _json_patch_remove(doc, source, op["from"])
            doc = _json_patch_add(doc, parts, value, path)
        elif verb == "test":
            if _walk(doc, parts, path) != op.get("value"):
                raise _patch_failed(f"test failed at {path!r}")
        else:
            raise bad_request(f"json patch: unknown op {verb!r}")
    return doc


# Lists kubectl merges by key in a strategic merge patch: field name -> candidate merge keys.
_MERGE_KEYS = {
    "containers": ("name",), "initContainers": ("name",), "ephemeralContainers": ("name",),
    "env": ("name",), "volumes": ("name",), "imagePullSecrets": ("name",),
    "volumeMounts": ("mountPath",), "conditions": ("type",), "hostAliases": ("ip",),
    "ports": ("containerPort", "port"), "addresses": ("type",),
}


def _merge_key(field: str, items: list) -> str | None:
    candidates = _MERGE_KEYS.get(field)
    if not candidates or not all(isinstance(i, dict) for i in items):
        return None
    for key in candidates:
        if any(key in i for i in items):
            return key
    return None


def strategic_merge_patch(target, patch):
    """The subset of Kubernetes' strategic merge patch that kubectl sends.

    Maps merge (null deletes); lists of containers, env, ports, volumes, conditions... merge by
    their key; other lists replace. Directives: $patch (replace|delete), $setElementOrder/<list>,
    $deleteFromPrimitiveList/<list>; $retainKeys is ignored.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return _strip(patch)
    result = dict(target) if isinstance(target, dict) else {}
    orders = {}
    for key, value in patch.items():
        if key.startswith("$setElementOrder/"):
            orders[key.split("/", 1)[1]] = value
        elif key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [x for x in result.get(field) or [] if x not in (value or [])]
        elif key.startswith("$"):
            continue
        elif value is None or (isinstance(value, dict) and value.get("$patch") == "delete"):
            result.pop(key, None)
        elif isinstance(value, dict):
            result[key] = strategic_merge_patch(result.get(key), value)
        elif isinstance(value, list):
            result[key] = _merge_list(key, result.get(key), value)
        else:
            result[key] = value
    for field, order in orders.items():
        if isinstance(result.get(field), list) and isinstance(order, list):
            result[field] = _reorder(field, result[field], order)
    return result


def _merge_list(field: str, current, patch: list) -> list:
    current = current if isinstance(current, list) else []
    if any(isinstance(i, dict) and i.get("$patch") == "replace" for i in patch):
        return [_strip(i) for i in patch if not (isinstance(i, dict) and i.get("$patch") == "replace")]
    if field == "finalizers":  # a primitive list merged as a set
        return current + [x for x in patch if x not in current]
    key = _merge_key(field, patch + current)
    if key is None:
        return [_strip(i) for i in patch]
    result = list(current)
    for item in patch:
        index = next((n for n, c in enumerate(result) if c.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if index is not None:
                result.pop(index)
        elif index is not None:
            result[index] = strategic_merge_patch(result[index], item)
        else:
            result.append(_strip(item))
    return result


def _strip(value):
    """Drop $-directives from a value that is inserted whole."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _reorder(field: str, items: list, order: list) -> list:
    key = _merge_key(field, items + order)
    if key is None:
        ranks = {json.dumps(v, sort_keys=True): n for n, v in enumerate(order)}
        return sorted(items, key=lambda v: ranks.get(json.dumps(v, sort_keys=True), len(ranks)))
    ranks = {o.get(key): n for n, o in enumerate(order) if isinstance(o, dict)}
    return sorted(items, key=lambda v: ranks.get(v.get(key), len(ranks)))


APPLY_PATCH = "application/apply-patch+yaml"
PATCH_TYPES = {
    "application/merge-patch+json": merge_patch,
    "application/strategic-merge-patch+json": strategic_merge_patch,
    "application/json-patch+json": json_patch,
    APPLY_PATCH: strategic_merge_patch,  # server-side apply stand-in: upsert, then merge
}


# =============================================================================================
# Storage keys and object encoding
# =============================================================================================

def storage_prefix(kind: Kind, namespace: str | None = None) -> str:
    """/registry/<group>/<plural>/[<ns>/]: "core" stands for the core group."""
    base = f"/registry/{kind.group or 'core'}/{kind.plural}/"
    return f"{base}{namespace}/" if kind.namespaced and namespace else base


def storage_key(kind: Kind, namespace: str | None, name: str) -> str:
    return f"{storage_prefix(kind, namespace)}{name}"


def encode(obj: dict) -> bytes:
    """Stored form: the object without its resourceVersion (the store revision is the truth)."""
    meta = {k: v for k, v in obj.get("metadata", {}).items() if k != "resourceVersion"}
    return json.dumps({**obj, "metadata": meta}, separators=(",", ":"), sort_keys=True).encode()


def decode(value: bytes, revision: int) -> dict:
    obj = json.loads(value)
    obj.setdefault("metadata", {})["resourceVersion"] = str(revision)
    return obj


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"


def generated_name(prefix: str) -> str:
    return prefix + "".join(random.choice(_NAME_CHARS) for _ in range(5))


def _desired_part(obj: dict) -> dict:
    """What counts as the object's desired state, for metadata.generation."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "kind", "apiVersion")}


def _comparable(obj: dict) -> dict:
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "resourceVersion"}
    return {**obj, "metadata": meta}


def _reset_status_on_create(obj: dict) -> dict:
    """What Kubernetes' create strategies do with a status a client sent."""
    fresh = {"Pod": {"phase": "Pending"}, "Namespace": {"phase": "Active"},
             "Service": {"loadBalancer": {}}, "Deployment": {}, "ReplicaSet": {}, "Ingress": {}}
    kind = obj.get("kind")
    return {**obj, "status": copy.deepcopy(fresh[kind])} if kind in fresh else obj


def _merge_server_fields(kind: Kind, current: dict, wanted: dict, subresource: str | None) -> dict:
    """The object to store for an update: server-owned metadata kept; on a /status write only
    the status changes, on a main write the status (where it has its own subresource) stays."""
    if subresource == "status":
        new = copy.deepcopy(current)
        new["status"] = copy.deepcopy(wanted.get("status") or {})
        return new
    if subresource == "ephemeralcontainers":   # kubectl debug: only the ephemeral containers change
        new = copy.deepcopy(current)
        new.setdefault("spec", {})["ephemeralContainers"] = copy.deepcopy((wanted.get("spec") or {}).get(
            "ephemeralContainers") or [])
        return new
    new = copy.deepcopy(wanted)
    if kind.kind == "Pod" and (current.get("spec") or {}).get("ephemeralContainers"):
        new.setdefault("spec", {})["ephemeralContainers"] = copy.deepcopy(current["spec"]["ephemeralContainers"])
    meta = new.setdefault("metadata", {})
    for field in ("uid", "creationTimestamp", "generation", "deletionTimestamp", "namespace", "name"):
        if field in current["metadata"]:
            meta[field] = current["metadata"][field]
        else:
            meta.pop(field, None)
    meta.pop("resourceVersion", None)
    if kind.kind in STATUS_SUBRESOURCE:
        if "status" in current:
            new["status"] = copy.deepcopy(current["status"])
        else:
            new.pop("status", None)
    return new


def scale_of(obj: dict) -> dict:
    """The autoscaling/v1 Scale view of a Deployment or ReplicaSet."""
    meta = obj["metadata"]
    spec = obj.get("spec") or {}
    match = (spec.get("selector") or {}).get("matchLabels") or {}
    return {"kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                              "creationTimestamp") if k in meta},
            "spec": {"replicas": spec.get("replicas", 0)},
            "status": {"replicas": (obj.get("status") or {}).get("replicas", 0),
                       "selector": ",".join(f"{k}={v}" for k, v in sorted(match.items()))}}


def _translate(event: store_mod.Event, selector: Callable[[dict], bool]) -> tuple[str, dict] | None:
    """A store event as the watcher sees it through its selector: leaving it is DELETED,
    entering it is ADDED."""
    obj = decode(event.value, event.revision)
    now = selector(obj)
    if event.type == "DELETED":
        return ("DELETED", obj) if now else None
    before = event.prev_value is not None and selector(json.loads(event.prev_value))
    if event.type == "ADDED" or not before:
        return ("ADDED", obj) if now else None
    return ("MODIFIED", obj) if now else ("DELETED", obj)


# =============================================================================================
# Registry: object semantics over the store
# =============================================================================================

class Registry:
    def __init__(self, store: store_mod.Store, allocators: Allocators | None = None):
        self.store = store
        self.allocators = allocators or Allocators()

    async def start(self) -> None:
        """Rebuild the allocators from the stored Services."""
        services, _ = await self.list(kinds.by_kind("Service"))
        for problem in self.allocators.rebuild(services):
            daemon.log_fields(log, logging.WARNING, "allocation clash in stored services", problem=problem)

    # --- reads --------------------------------------------------------------------------------

    async def _get_kv(self, kind: Kind, namespace: str | None, name: str) -> store_mod.KeyValue:
        kv = await self.store.get(storage_key(kind, namespace, name))
        if kv is None:
            raise not_found(kind, name)
        return kv

    async def get(self, kind: Kind, namespace: str | None, name: str) -> dict:
        kv = await self._get_kv(kind, namespace, name)
        return decode(kv.value, kv.mod_revision)

    async def list(self, kind: Kind, namespace: str | None = None,
                   selector: Callable[[dict], bool] | None = None) -> tuple[list[dict], int]:
        kvs, revision = await self.store.list(storage_prefix(kind, namespace))
        items = [decode(kv.value, kv.mod_revision) for kv in kvs]
        return [o for o in items if selector is None or selector(o)], revision

    # --- create -------------------------------------------------------------------------------

    @staticmethod
    def _check_identity(kind: Kind, namespace: str | None, obj) -> dict:
        """The body as an object of `kind` in `namespace` (filled in), or 400 BadRequest."""
        if not isinstance(obj, dict):
            raise bad_request(f"the body must be a {kind.kind} object")
        if obj.get("kind") not in (None, "", kind.kind):
            raise bad_request(f"the body is a {obj.get('kind')!r}, but the path is for {kind.kind} ({kind.plural})")
        if obj.get("apiVersion") not in (None, "", kind.api_version):
            raise bad_request(f"{kind.kind} is served as apiVersion {kind.api_version!r}, "
                              f"not {obj.get('apiVersion')!r}")
        meta = obj.get("metadata") or {}
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        meta = dict(meta)
        if kind.namespaced:
            if meta.get("namespace") and namespace and meta["namespace"] != namespace:
                raise bad_request("the namespace of the provided object does not match the namespace "
                                  f"sent on the request ({meta['namespace']!r} vs {namespace!r})")
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        return {**obj, "kind": kind.kind, "apiVersion": kind.api_version, "metadata": meta}

    async def _require_namespace(self, kind: Kind, namespace: str | None) -> None:
        ns_kind = kinds.by_kind("Namespace")
        if kind.namespaced and await self.store.get(storage_key(ns_kind, None, namespace)) is None:
            raise APIStatus(404, "NotFound", f'namespaces "{namespace}" not found',
                            {"name": namespace, "kind": "namespaces"})

    @staticmethod
    def _raise_invalid(kind: Kind, obj: dict, errors: list) -> None:
        if errors:
            raise invalid(kind, (obj.get("metadata") or {}).get("name") or "", errors)

    def _allocate(self, kind: Kind, obj: dict, old: dict | None) -> dict:
        try:
            return self.allocators.assign(obj, old)
        except AllocationError as err:
            raise invalid(kind, obj["metadata"]["name"],
                          [(err.field, validation.invalid(err.value, err.message))]) from None

    async def create(self, kind: Kind, namespace: str | None, obj: dict, dry_run: bool = False) -> dict:
        """Store a new object; dry_run does every check and allocation, then stores nothing."""
        obj = self._check_identity(kind, namespace, obj)
        meta = obj["metadata"]
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = generated_name(meta["generateName"])
        uid = str(uuid.uuid4())
        if kind.kind == "Job":   # its selector names its uid, as Kubernetes generates it
            obj = validation.job_selector_defaulted(obj, uid)
        obj = validation.default(obj)
        self._raise_invalid(kind, obj, validation.validate(obj))
        meta = obj["metadata"]
        await self._require_namespace(kind, meta.get("namespace"))
        for server_field in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds",
                             "managedFields", "selfLink"):
            meta.pop(server_field, None)
        meta.update(uid=uid, creationTimestamp=now_rfc3339(), generation=1)
        obj = _reset_status_on_create(obj)
        key = storage_key(kind, meta.get("namespace"), meta["name"])
        if await self.store.get(key) is not None:  # before allocating: a duplicate is 409, not a clash
            raise already_exists(kind, meta["name"])
        if kind.kind == "Service":
            obj = self._allocate(kind, obj, None)
        if dry_run:
            if kind.kind == "Service":
                self.allocators.release(obj)
            return obj
        try:
            revision = await self.store.create(key, encode(obj))
        except BaseException as err:
            if kind.kind == "Service":
                self.allocators.release(obj)
            if isinstance(err, store_mod.AlreadyExists):
                raise already_exists(kind, meta["name"]) from None
            raise
        obj["metadata"]["resourceVersion"] = str(revision)
        return obj

    # --- update -------------------------------------------------------------------------------

    async def update(self, kind: Kind, namespace: str | None, name: str, obj,
                     subresource: str | None = None, dry_run: bool = False) -> dict:
        """PUT: replace the object (or, for subresource "status", only its status)."""
        obj = self._check_identity(kind, namespace, obj)
        body_name = obj["metadata"].get("name")
        if body_name and body_name != name:
            raise bad_request(f"the name of the object ({body_name!r}) does not match the name on the URL ({name!r})")
        kv = await self._get_kv(kind, namespace, name)
        current = decode(kv.value, kv.mod_revision)
        wanted_rv = obj["metadata"].get("resourceVersion")
        if wanted_rv and wanted_rv != str(kv.mod_revision):
            raise conflict(kind, name)
        return await self._replace(kind, current, kv.mod_revision, obj, subresource, dry_run)

    async def _replace(self, kind: Kind, current: dict, revision: int, wanted: dict,
                       subresource: str | None, dry_run: bool = False) -> dict:
        name = current["metadata"]["name"]
        new = validation.default(_merge_server_fields(kind, current, wanted, subresource))
        self._raise_invalid(kind, new, validation.validate(new) + validation.validate_update(current, new))
        if _desired_part(new) != _desired_part(current):
            new["metadata"]["generation"] = int(current["metadata"].get("generation") or 1) + 1
        is_service = kind.kind == "Service"
        if is_service:
            new = self._allocate(kind, new, current)
        if _comparable(new) == _comparable(current):
            return current  # a no-op write changes nothing, not even the resourceVersion
        if dry_run:
            if is_service:
                self.allocators.commit_release(new, current)
            new["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            return new
        key = storage_key(kind, current["metadata"].get("namespace"), name)
        try:
            new_revision = await self.store.update(key, encode(new), revision)
        except BaseException as err:
            if is_service:
                self.allocators.commit_release(new, current)  # give back what assign() took
            if isinstance(err, store_mod.Conflict):
                raise conflict(kind, name) from None
            if isinstance(err, store_mod.NotFound):
                raise not_found(kind, name) from None
            raise
        if is_service:
            self.allocators.commit_release(current, new)
        new["metadata"]["resourceVersion"] = str(new_revision)
        return new

    async def patch(self, kind: Kind, namespace: str | None, name: str, content_type: str,
                    body, subresource: str | None = None, dry_run: bool = False) -> tuple[dict, bool]:
        """Apply a patch to the current object; returns (object, created). Retries lost races."""
        apply = PATCH_TYPES.get(content_type)
        if apply is None:
            raise APIStatus(415, "UnsupportedMediaType",
                            f"the body of the request was in an unknown format - accepted media types "
                            f"include: {', '.join(PATCH_TYPES)}")
        for _ in range(5):
            kv = await self.store.get(storage_key(kind, namespace, name))
            if kv is None:
                if content_type == APPLY_PATCH and not subresource and isinstance(body, dict):
                    body = {**body, "metadata": {**(body.get("metadata") or {}), "name": name}}
                    return await self.create(kind, namespace, body, dry_run), True
                raise not_found(kind, name)
            current = decode(kv.value, kv.mod_revision)
            patched = apply(current, body)
            if not isinstance(patched, dict):
                raise bad_request("the patch does not produce an object")
            wanted_rv = (patched.get("metadata") or {}).get("resourceVersion")
            if wanted_rv and wanted_rv != str(kv.mod_revision):
                raise conflict(kind, name)
            patched = self._check_identity(kind, namespace, patched)
            try:
                return await self._replace(kind, current, kv.mod_revision, patched, subresource, dry_run), False
            except APIStatus as err:
                if err.reason != "Conflict" or wanted_rv:
                    raise
        raise conflict(kind, name)

    # --- delete -------------------------------------------------------------------------------

    async def delete(self, kind: Kind, namespace: str | None, name: str, options: dict | None = None,
                     dry_run: bool = False) -> dict:
        """Delete at once (no graceful deletion); dependents and a namespace's contents go too."""
        options = options if isinstance(options, dict) else {}
        if kind.kind == "Namespace" and name in UNDELETABLE_NAMESPACES:
            raise APIStatus(403, "Forbidden", f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                            {"name": name, "kind": "namespaces"})
        kv = await self._get_kv(kind, namespace, name)
        current = decode(kv.value, kv.mod_revision)
        preconditions = options.get("preconditions") or {}
        if preconditions.get("uid") and preconditions["uid"] != current["metadata"].get("uid"):
            raise conflict(kind, name, "Precondition failed: UID in precondition does not match the object")
        if preconditions.get("resourceVersion") and preconditions["resourceVersion"] != str(kv.mod_revision):
            raise conflict(kind, name)
        if dry_run:
            return current
        try:
            deleted = await self.store.delete(storage_key(kind, namespace, name), kv.mod_revision)
        except store_mod.NotFound:
            raise not_found(kind, name) from None
        except store_mod.Conflict:
            raise conflict(kind, name) from None
        if kind.kind == "Service":
            self.allocators.release(current)
        current["metadata"]["resourceVersion"] = str(deleted.mod_revision)
        if kind.kind == "Namespace":
            await self._delete_namespace_contents(name)
        elif options.get("propagationPolicy") != "Orphan":
            await self._delete_dependents(current)
        return current

    async def _delete_namespace_contents(self, namespace: str) -> None:
        for kind in KINDS:
            if kind.namespaced:
                items, _ = await self.list(kind, namespace)
                for item in items:
                    await self._delete_if_present(kind, namespace, item["metadata"]["name"])

    async def _delete_dependents(self, owner: dict) -> None:
        """Garbage collection by ownerReferences (Background propagation, done at once)."""
        uid = owner["metadata"].get("uid")
        namespace = owner["metadata"].get("namespace")
        if not uid or not namespace:
            return
        for kind in KINDS:
            if not kind.namespaced:
                continue
            items, _ = await self.list(kind, namespace)
            for item in items:
                if any(ref.get("uid") == uid for ref in item["metadata"].get("ownerReferences") or []):
                    await self._delete_if_present(kind, namespace, item["metadata"]["name"])

    async def _delete_if_present(self, kind: Kind, namespace: str | None, name: str,
                                 options: dict | None = None) -> dict | None:
        try:
            return await self.delete(kind, namespace, name, options)
        except APIStatus as err:
            if err.code != 404:
                raise
            return None

    async def delete_collection(self, kind: Kind, namespace: str | None, selector: Selector,
                                options: dict | None = None, dry_run: bool = False) -> list[dict]:
        items, _ = await self.list(kind, namespace, selector)
        if dry_run:
            return items
        deleted = [await self._delete_if_present(kind, item["metadata"].get("namespace"),
                                                 item["metadata"]["name"], options) for item in items]
        return [d for d in deleted if d is not None]

    async def expire_events(self, now: datetime) -> int:
        """Delete the events last seen more than events.TTL ago (kube-apiserver's --event-ttl)."""
        kind = kinds.by_kind("Event")
        items, _ = await self.list(kind)
        gone = [e for e in items if events.expired(e, now)]
        for event in gone:
            meta = event["metadata"]
            try:
                await self.store.delete(storage_key(kind, meta.get("namespace"), meta["name"]))
            except store_mod.NotFound:   # deleted meanwhile
                pass
        return len(gone)

    # --- subresources -------------------------------------------------------------------------

    async def bind(self, namespace: str, name: str, binding) -> None:
        """pods/binding: set spec.nodeName once; a pod already bound is a 409 Conflict."""
        pods = kinds.by_kind("Pod")
        target = (binding or {}).get("target") or {} if isinstance(binding, dict) else {}
        node = target.get("name")
        if not node:
            raise invalid(pods, name, [("target.name", validation.required())])
        if target.get("kind") not in (None, "", "Node"):
            raise invalid(pods, name, [("target.kind", validation.unsupported(target["kind"], ("Node",)))])
        for _ in range(5):
            kv = await self._get_kv(pods, namespace, name)
            pod = decode(kv.value, kv.mod_revision)
            bound = (pod.get("spec") or {}).get("nodeName")
            if bound:
                raise APIStatus(409, "Conflict", f'Operation cannot be fulfilled on pods/binding "{name}": '
                                f'pod {name} is already assigned to node "{bound}"',
                                {"name": name, "kind": "pods"})
            pod.setdefault("spec", {})["nodeName"] = node
            status = pod.setdefault("status", {})
            conditions = [c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"]
            status["conditions"] = conditions + [{"type": "PodScheduled", "status": "True",
                                                  "lastTransitionTime": now_rfc3339()}]
            try:
                await self.store.update(storage_key(pods, namespace, name), encode(pod), kv.mod_revision)
                return
            except store_mod.Conflict:
                continue
        raise conflict(pods, name)

    async def get_scale(self, kind: Kind, namespace: str, name: str) -> dict:
        return scale_of(await self.get(kind, namespace, name))

    async def update_scale(self, kind: Kind, namespace: str, name: str, content_type: str | None,
                           body, dry_run: bool = False) -> dict:
        """PUT (content_type None) or PATCH a Scale: writes spec.replicas of the workload."""
        current = await self.get(kind, namespace, name)
        if content_type is None:
            new_scale = body
        else:
            apply = PATCH_TYPES.get(content_type)
            if apply is None:
                raise APIStatus(415, "UnsupportedMediaType", f"unsupported patch type {content_type!r}")
            new_scale = apply(scale_of(current), body)
        if not isinstance(new_scale, dict):
            raise bad_request("the body must be a Scale object")
        replicas = (new_scale.get("spec") or {}).get("replicas")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise invalid(kind, name, [("spec.replicas",
                                        validation.invalid(replicas, "must be greater than or equal to 0"))])
        wanted_rv = (new_scale.get("metadata") or {}).get("resourceVersion")
        if content_type is None and wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
            raise conflict(kind, name)
        patched, _ = await self.patch(kind, namespace, name, "application/merge-patch+json",
                                      {"spec": {"replicas": replicas}}, dry_run=dry_run)
        return scale_of(patched)

    # --- watch --------------------------------------------------------------------------------

    async def watch(self, kind: Kind, namespace: str | None, resource_version: str | None,
                    selector: Callable[[dict], bool],
                    bookmarks: bool = False) -> AsyncIterator[tuple[str, dict]]:
        """(type, object) events; resourceVersion "" or "0" starts with ADDED for each current object.

        Raises APIStatus 410 Expired when the resourceVersion has been compacted away.
        """
        if resource_version in (None, "", "0"):
            items, after = await self.list(kind, namespace, selector)
            for item in items:
                yield "ADDED", item
        else:
            try:
                after = int(resource_version)
            except ValueError:
                raise bad_request(f"invalid resourceVersion {resource_version!r}") from None
        events = self.store.watch(storage_prefix(kind, namespace), after,
                                  progress_interval=BOOKMARK_INTERVAL if bookmarks else None)
        try:
            async for event in events:
                if event.type == "PROGRESS":
                    yield "BOOKMARK", {"kind": kind.kind, "apiVersion": kind.api_version,
                                       "metadata": {"resourceVersion": str(event.revision)}}
                    continue
                translated = _translate(event, selector)
                if translated is not None:
                    yield translated
        except store_mod.Gone as err:
            raise expired(f"too old resource version: {err.revision} ({err.compacted})") from None
        finally:
            await events.aclose()


# =============================================================================================
# Discovery and OpenAPI documents (pure)
# =============================================================================================

def _subresources(kind: Kind) -> list[tuple[str, str, str, str, list[str]]]:
    """(name, group, version, kind, verbs) of each subresource served for `kind`."""
    subs = []
    if kind.kind in STATUS_SUBRESOURCE:
        subs.append(("status", kind.group, kind.version, kind.kind, ["get", "patch", "update"]))
    if kind.kind in SCALE_SUBRESOURCE:
        subs.append(("scale", "autoscaling", "v1", "Scale", ["get", "patch", "update"]))
    if kind.kind == "Pod":
        subs.append(("binding", "", "v1", "Binding", ["create"]))
        subs.append(("log", "", "v1", "Pod", ["get"]))
        subs.append(("exec", "", "v1", "PodExecOptions", ["create", "get"]))
        subs.append(("attach", "", "v1", "PodAttachOptions", ["create", "get"]))
        subs.append(("portforward", "", "v1", "PodPortForwardOptions", ["create", "get"]))
        subs.append(("ephemeralcontainers", "", "v1", "Pod", ["get", "patch", "update"]))
    if kind.kind in ("Pod", "Service"):
        subs.append(("proxy", "", "v1", f"{kind.kind}ProxyOptions", ["create", "delete", "get", "patch", "update"]))
    return subs


# Create-only resources, answered at once and never stored: `kubectl auth can-i` and `kubectl auth
# whoami`. This API server authenticates no one and authorizes everything (a lab's trust model), so
# every request is system:anonymous's and every one is allowed, as an AlwaysAllow authorizer says.
REVIEW_KINDS = (
    Kind("SelfSubjectAccessReview", "authorization.k8s.io", "v1", "selfsubjectaccessreviews", False),
    Kind("SelfSubjectRulesReview", "authorization.k8s.io", "v1", "selfsubjectrulesreviews", False),
    Kind("SelfSubjectReview", "authentication.k8s.io", "v1", "selfsubjectreviews", False),
)
_REVIEWS = {(k.group, k.version, k.plural): k for k in REVIEW_KINDS}
# Read-only resources computed on each request from the nodes' agents (netplane.podmetrics): kubectl top.
METRICS_KINDS = (Kind("NodeMetrics", "metrics.k8s.io", "v1beta1", "nodes", False),
                 Kind("PodMetrics", "metrics.k8s.io", "v1beta1", "pods", True))
METRICS_GROUP = "metrics.k8s.io"
UNSTORED_KINDS = (*REVIEW_KINDS, *METRICS_KINDS)   # in discovery, answered per request, never in the store
ALLOWED_REASON = "netplane's API server allows every request (no authentication, AlwaysAllow authorization)"


def review(kind: Kind, body: dict) -> dict:
    """The answer to a review request (its spec back, with the status); APIStatus 400 when the
    request is not one."""
    if not isinstance(body, dict) or body.get("kind") not in (None, kind.kind):
        raise bad_request(f"the request body must be a {kind.kind}")
    spec = body.get("spec") or {}
    if kind.kind == "SelfSubjectAccessReview":
        if bool(spec.get("resourceAttributes")) == bool(spec.get("nonResourceAttributes")):
            raise APIStatus(422, "Invalid", f"{kind.kind}.authorization.k8s.io is invalid: spec.resourceAttributes: "
                                            "Invalid value: \"null\": exactly one of nonResourceAttributes or "
                                            "resourceAttributes must be specified")
        status = {"allowed": True, "reason": ALLOWED_REASON}
    elif kind.kind == "SelfSubjectRulesReview":
        status = {"resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}],
                  "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}], "incomplete": False}
    else:
        status = {"userInfo": {"username": "system:anonymous", "groups": ["system:unauthenticated"]}}
    return {"apiVersion": kind.api_version, "kind": kind.kind, "metadata": {"creationTimestamp": None},
            **({"spec": spec} if kind.kind != "SelfSubjectReview" else {}), "status": status}


def _verbs(kind: Kind) -> list[str]:
    if kind in REVIEW_KINDS:
        return ["create"]
    return ["get", "list"] if kind in METRICS_KINDS else VERBS


def group_versions() -> dict[tuple[str, str], list[Kind]]:
    grouped: dict[tuple[str, str], list[Kind]] = {}
    for kind in (*KINDS, *UNSTORED_KINDS):
        grouped.setdefault((kind.group, kind.version), []).append(kind)
    return grouped


def _groups() -> list[str]:
    return list(dict.fromkeys(g for (g, _) in group_versions() if g))


def api_resource_list(group: str, version: str) -> dict | None:
    """Legacy discovery: GET /api/v1, /apis/G/V (what the Python DynamicClient reads)."""
    members = group_versions().get((group, version))
    if members is None:
        return None
    resources = []
    for kind in members:
        entry = {"name": kind.plural, "singularName": kind.singular, "namespaced": kind.namespaced,
                 "kind": kind.kind, "verbs": _verbs(kind)}
        if kind.short_names:
            entry["shortNames"] = list(kind.short_names)
        if kind.kind in CATEGORY_ALL:
            entry["categories"] = ["all"]
        resources.append(entry)
        for sub, s_group, s_version, s_kind, verbs in _subresources(kind):
            sub_entry = {"name": f"{kind.plural}/{sub}", "singularName": "", "namespaced": kind.namespaced,
                         "kind": s_kind, "verbs": verbs}
            if (s_group, s_version) != (group, version):
                sub_entry.update(group=s_group, version=s_version)
            resources.append(sub_entry)
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version, "resources": resources}


def api_group(group: str) -> dict | None:
    versions = [v for (g, v) in group_versions() if g == group]
    if not group or not versions:
        return None
    entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": entries,
            "preferredVersion": entries[0]}


def api_group_list() -> dict:
    groups = [{k: v for k, v in api_group(g).items() if k not in ("kind", "apiVersion")} for g in _groups()]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_versions(server_address: str) -> dict:
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]}


def aggregated_discovery(core: bool, api_version: str) -> dict:
    """Aggregated discovery (apidiscovery.k8s.io v2 or v2beta1) of /api (core) or /apis."""
    items = []
    for group in [""] if core else _groups():
        versions = [{"version": version, "freshness": "Current",
                     "resources": [_aggregated_resource(k) for k in members]}
                    for (g, version), members in group_versions().items() if g == group]
        items.append({"metadata": {"name": group}, "versions": versions})
    return {"kind": "APIGroupDiscoveryList", "apiVersion": f"apidiscovery.k8s.io/{api_version}",
            "metadata": {}, "items": items}


def _aggregated_resource(kind: Kind) -> dict:
    entry = {"resource": kind.plural,
             "responseKind": {"group": kind.group, "version": kind.version, "kind": kind.kind},
             "scope": "Namespaced" if kind.namespaced else "Cluster",
             "singularResource": kind.singular, "verbs": _verbs(kind)}
    if kind.short_names:
        entry["shortNames"] = list(kind.short_names)
    if kind.kind in CATEGORY_ALL:
        entry["categories"] = ["all"]
    subs = [{"subresource": name, "responseKind": {"group": g, "version": v, "kind": k}, "verbs": verbs}
            for name, g, v, k, verbs in _subresources(kind)]
    if subs:
        entry["subresources"] = subs
    return entry


AGGREGATED_TYPE = "application/json;g=apidiscovery.k8s.io;v={v};as=APIGroupDiscoveryList"


def negotiate_discovery(accept: str) -> str | None:
    """'v2', 'v2beta1' or None (legacy JSON): the first Accept entry we can serve, in order."""
    for entry in accept.split(","):
        media, *raw_params = [p.strip() for p in entry.split(";")]
        params = dict(p.split("=", 1) for p in raw_params if "=" in p)
        if media == "application/json" and params.get("g") == "apidiscovery.k8s.io" \
                and params.get("as") == "APIGroupDiscoveryList" and params.get("v") in ("v2", "v2beta1"):
            return params["v"]
        if media in ("application/json", "*/*", "application/*") and "as" not in params:
            return None
    return None


def openapi_document(group: str, version: str) -> dict | None:
    """The minimal OpenAPI v3 document that lets `kubectl apply` leave field validation to us."""
    members = group_versions().get((group, version))
    if members is None:
        return None
    paths = {}
    for kind in (k for k in members if k not in UNSTORED_KINDS):
        ns = "/namespaces/{namespace}" if kind.namespaced else ""
        paths[f"{kind.prefix}{ns}/{kind.plural}/{{name}}"] = {"patch": {
            "x-kubernetes-group-version-kind": {"group": kind.group, "version": kind.version, "kind": kind.kind},
            "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
            "responses": {}}}
    return {"openapi": "3.0.0", "info": {"title": "netplane", "version": VERSION["gitVersion"]}, "paths": paths}


def openapi_index() -> dict:
    paths = {}
    for group, version in group_versions():
        gv = f"api/{version}" if not group else f"apis/{group}/{version}"
        digest = hashlib.sha256(json.dumps(openapi_document(group, version), sort_keys=True).encode())
        paths[gv] = {"serverRelativeURL": f"/openapi/v3/{gv}?hash={digest.hexdigest()[:32].upper()}"}
    return {"paths": paths}


# =============================================================================================
# HTTP
# =============================================================================================

TABLE_TYPE = "application/json;as=Table;v={v};g=meta.k8s.io"


def negotiate_table(accept: str) -> str | None:
    """'v1' or 'v1beta1' when the client (kubectl get) asks for a meta.k8s.io Table first."""
    for entry in accept.split(","):
        media, *raw_params = [p.strip() for p in entry.split(";")]
        params = dict(p.split("=", 1) for p in raw_params if "=" in p)
        if media == "application/json" and params.get("as") == "Table" and params.get("g") == "meta.k8s.io" \
                and params.get("v") in ("v1", "v1beta1"):
            return params["v"]
        if media in ("application/json", "*/*") and "as" not in params:
            return None
    return None


def as_table(kind: Kind, items: list[dict], version: str, include_object: str,
             resource_version: str = "", with_columns: bool = True) -> dict:
    """A meta.k8s.io Table of `items`, the columns kubectl shows (its printers live in kubectl.py)."""
    from netplane.kubectl import table_cells, table_columns
    now = datetime.now(timezone.utc)
    rows = []
    for obj in items:
        row = {"cells": table_cells(kind, obj, now)}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": f"meta.k8s.io/{version}",
                             "metadata": obj.get("metadata", {})}
        rows.append(row)
    return {"kind": "Table", "apiVersion": f"meta.k8s.io/{version}",
            "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": table_columns(kind) if with_columns else [], "rows": rows}


def _json(body: dict, status: int = 200, content_type: str = "application/json") -> web.Response:
    return web.Response(body=json.dumps(body, separators=(",", ":")).encode(), status=status,
                        headers={"Content-Type": content_type})


def _success(code: int = 200) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": code}


class ResourcePath:
    """A parsed resource URL: /api/v1/namespaces/ns/pods/name/status and friends."""

    def __init__(self, kind: Kind, namespace: str | None, name: str | None, subresource: str | None):
        self.kind, self.namespace, self.name, self.subresource = kind, namespace, name, subresource


def parse_resource_path(group: str, version: str, rest: list[str]) -> ResourcePath | None:
    """rest: the segments after /api/v1 or /apis/G/V. None when no kind is served there."""
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        candidate = kinds.by_path(group, version, rest[2])
        if candidate is not None and candidate.namespaced:  # else: namespaces/{name}/status
            namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 3:
        return None
    kind = kinds.by_path(group, version, rest[0])
    if kind is None:
        return None
    return ResourcePath(kind, namespace, rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None)


def _verb(method: str, path: ResourcePath, watch: bool) -> str:
    if method == "GET":
        return "watch" if watch else "get" if path.name else "list"
    return {"POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if path.name else "deletecollection"}.get(method, method.lower())


def _is_watch(request: web.Request) -> bool:
    return request.query.get("watch", "").lower() in ("true", "1")


def _dry_run(request: web.Request) -> bool:
    """?dryRun=All (kubectl --dry-run=server, kubectl diff): check everything, store nothing."""
    values = request.query.getall("dryRun", [])
    if any(v != "All" for v in values):
        raise bad_request(f"unsupported dryRun value(s) {values}: only 'All' is supported")
    return bool(values)


async def _read_body(request: web.Request):
    raw = await request.read()
    if not raw:
        return None
    content_type = request.content_type
    if "protobuf" in content_type:
        raise APIStatus(415, "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types include: "
                        "application/json, application/yaml (protobuf bodies are not supported)")
    try:
        return yaml.safe_load(raw) if "yaml" in content_type else json.loads(raw)
    except (ValueError, yaml.YAMLError) as err:
        raise bad_request(f"the body of the request does not parse: {err}") from None


class APIServer:
    """The HTTP face of the Registry: start(listen) / stop(), or app() for tests."""

    def __init__(self, store: store_mod.Store, advertise_address: str = "127.0.0.1",
                 advertise_port: int = 6443, compact_interval: float = 300.0):
        self.store = store
        self.registry = Registry(store)
        self.advertise_address = advertise_address
        self.advertise_port = advertise_port
        self.compact_interval = compact_interval
        self.stopping = asyncio.Event()
        self.ready = False
        self._runner: web.AppRunner | None = None
        self._compactor: asyncio.Task | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def prepare(self) -> None:
        await self.registry.start()
        await bootstrap(self.registry, self.advertise_address, self.advertise_port)
        self.ready = True

    async def start(self, listen: str) -> int:
        """Serve on `listen` (ADDR:PORT; port 0 picks one); returns the bound port."""
        await self.prepare()
        # handler_cancellation: a watch whose client went away is cancelled, not left waiting.
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True,
                                     shutdown_timeout=2.0)
        await self._runner.setup()
        host, port = daemon.split_hostport(listen)
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        bound = self._runner.addresses[0][1]
        self._compactor = asyncio.create_task(self._compact_forever())
        daemon.log_fields(log, logging.INFO, "serving", listen=f"{host}:{bound}",
                          advertise=f"{self.advertise_address}:{self.advertise_port}")
        return bound

    async def stop(self) -> None:
        self.stopping.set()
        if self._compactor:
            self._compactor.cancel()
            await asyncio.gather(self._compactor, return_exceptions=True)
        if self._runner:
            await self._runner.cleanup()

    async def _compact_forever(self) -> None:
        """Every interval, forget history older than the previous tick (as kube-apiserver does)."""
        previous = await self.store.current_revision()
        while True:
            await asyncio.sleep(self.compact_interval)
            try:
                removed = await self.store.compact(previous)
                daemon.log_fields(log, logging.INFO, "compacted", revision=previous, rows=removed)
                expired = await self.registry.expire_events(datetime.now(timezone.utc))
                if expired:
                    daemon.log_fields(log, logging.INFO, "events expired", count=expired)
            except Exception:  # keep serving; the next tick tries again
                log.exception("compaction failed")
            previous = await self.store.current_revision()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=8 * 1024 * 1024)
        get = app.router.add_get
        for path in ("/healthz", "/livez"):
            get(path, self._healthz)
        get("/readyz", self._readyz)
        get("/metrics", self._metrics)
        get("/version", self._version)
        get("/version/", self._version)
        for path in ("/api", "/api/"):
            get(path, self._api_root)
        for path in ("/apis", "/apis/"):
            get(path, self._apis_root)
        get("/openapi/v3", self._openapi_index)
        get("/openapi/v3/{gv:.+}", self._openapi_doc)
        app.router.add_route("*", "/api/{tail:.+}", self._core)
        app.router.add_route("*", "/apis/{tail:.+}", self._groups)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, _app) -> None:
        self.stopping.set()  # ends every watch stream, so shutdown does not wait on them

    # --- middleware: errors as Status, metrics, logs -----------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        started = time.monotonic()
        try:
            response = await handler(request)
        except APIStatus as err:
            response = _json(err.status(), err.code)
        except web.HTTPNotFound:
            response = _json(path_not_found().status(), 404)
        except web.HTTPMethodNotAllowed:
            response = _json(APIStatus(405, "MethodNotAllowed",
                                       "the server does not allow this method on the requested resource").status(), 405)
        except Exception as err:  # a bug answers 500 with a Status; the server keeps serving
            log.exception("request failed: %s %s", request.method, request.path)
            response = _json(APIStatus(500, "InternalError", f"an error on the server: {err}").status(), 500)
        verb, resource = request.get(VERB, request.method.lower()), request.get(RESOURCE, "")
        REQUESTS.labels(verb, resource, str(response.status)).inc()
        elapsed = time.monotonic() - started
        if verb != "watch":
            LATENCY.labels(verb, resource).observe(elapsed)
        if request.method != "GET" or response.status >= 400:
            daemon.log_fields(log, logging.ERROR if response.status >= 500 else logging.INFO, "request",
                              verb=verb, path=request.path, code=response.status, ms=round(elapsed * 1000, 1))
        return response

    # --- plain endpoints ----------------------------------------------------------------------

    async def _healthz(self, _request) -> web.Response:
        return web.Response(text="ok")

    async def _readyz(self, _request) -> web.Response:
        return web.Response(text="ok" if self.ready else "starting", status=200 if self.ready else 503)

    async def _metrics(self, _request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _version(self, _request) -> web.Response:
        return _json(VERSION)

    def _discovery(self, request: web.Request, core: bool) -> web.Response:
        request[VERB], request[RESOURCE] = "get", "discovery"
        wanted = negotiate_discovery(request.headers.get("Accept", "application/json"))
        if wanted:
            return _json(aggregated_discovery(core, wanted), content_type=AGGREGATED_TYPE.format(v=wanted))
        if core:
            return _json(api_versions(f"{self.advertise_address}:{self.advertise_port}"))
        return _json(api_group_list())

    async def _api_root(self, request) -> web.Response:
        return self._discovery(request, core=True)

    async def _apis_root(self, request) -> web.Response:
        return self._discovery(request, core=False)

    async def _openapi_index(self, request) -> web.Response:
        request[VERB], request[RESOURCE] = "get", "openapi"
        return _json(openapi_index())

    async def _openapi_doc(self, request) -> web.Response:
        request[VERB], request[RESOURCE] = "get", "openapi"
        parts = request.match_info["gv"].strip("/").split("/")
        doc = None
        if parts[0] == "api" and len(parts) == 2:
            doc = openapi_document("", parts[1])
        elif parts[0] == "apis" and len(parts) == 3:
            doc = openapi_document(parts[1], parts[2])
        if doc is None:
            raise path_not_found()
        return _json(doc)

    # --- resources ----------------------------------------------------------------------------

    async def _core(self, request: web.Request) -> web.StreamResponse:
        segments = [s for s in request.match_info["tail"].split("/") if s]
        if not segments or segments[0] != "v1":
            raise path_not_found()
        return await self._resource(request, "", "v1", segments[1:])

    async def _groups(self, request: web.Request) -> web.StreamResponse:
        segments = [s for s in request.match_info["tail"].split("/") if s]
        if len(segments) == 1:
            request[VERB], request[RESOURCE] = "get", "discovery"
            group = api_group(segments[0])
            if group is None:
                raise path_not_found()
            return _json(group)
        return await self._resource(request, segments[0], segments[1], segments[2:])

    async def _resource(self, request: web.Request, group: str, version: str,
                        rest: list[str]) -> web.StreamResponse:
        if not rest:
            request[VERB], request[RESOURCE] = "get", "discovery"
            listing = api_resource_list(group, version)
            if listing is None:
                raise path_not_found()
            return _json(listing)
        if (group, version) == ("", "v1") and len(rest) >= 5 and rest[0] == "namespaces" \
                and rest[2] in ("pods", "services") and rest[4] == "proxy":
            return await self._proxy(request, rest[1], rest[2], rest[3])
        if (group, version) == (METRICS_GROUP, "v1beta1"):
            return await self._resource_metrics(request, rest)
        reviewed = _REVIEWS.get((group, version, rest[0]))
        if reviewed is not None and len(rest) == 1:
            request[VERB], request[RESOURCE] = "create", reviewed.plural
            if request.method != "POST":
                raise web.HTTPMethodNotAllowed(request.method, ["POST"])
            return _json(review(reviewed, await _read_body(request)), 201)
        path = parse_resource_path(group, version, rest)
        if path is None:
            raise path_not_found()
        watch = _is_watch(request)
        request[VERB], request[RESOURCE] = _verb(request.method, path, watch), path.kind.plural
        if path.subresource:
            return await self._subresource(request, path)
        if path.name is None:
            return await self._collection(request, path, watch)
        return await self._object(request, path, watch)

    async def _collection(self, request: web.Request, path: ResourcePath, watch: bool) -> web.StreamResponse:
        selector = Selector(request.query.get("labelSelector"), request.query.get("fieldSelector"))
        kind, ns = path.kind, path.namespace
        if request.method == "GET":
            if watch:
                return await self._watch(request, path, selector)
            items, revision = await self.registry.list(kind, ns, selector)
            if table := negotiate_table(request.headers.get("Accept", "")):
                return _json(as_table(kind, items, table, request.query.get("includeObject", "Metadata"),
                                      str(revision)), content_type=TABLE_TYPE.format(v=table))
            return _json({"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                          "metadata": {"resourceVersion": str(revision)}, "items": items})
        if request.method == "POST":
            created = await self.registry.create(kind, ns, await _read_body(request), _dry_run(request))
            return _json(created, 201)
        if request.method == "DELETE":
            deleted = await self.registry.delete_collection(kind, ns, selector, await _read_body(request),
                                                            _dry_run(request))
            return _json({"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                          "metadata": {}, "items": deleted})
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST", "DELETE"])

    async def _object(self, request: web.Request, path: ResourcePath, watch: bool) -> web.StreamResponse:
        kind, ns, name = path.kind, path.namespace, path.name
        if kind.namespaced and ns is None:
            raise path_not_found()
        if request.method == "GET":
            if watch:
                fields = ",".join(filter(None, [request.query.get("fieldSelector"), f"metadata.name={name}"]))
                return await self._watch(request, path, Selector(request.query.get("labelSelector"), fields))
            obj = await self.registry.get(kind, ns, name)
            if table := negotiate_table(request.headers.get("Accept", "")):
                return _json(as_table(kind, [obj], table, request.query.get("includeObject", "Metadata"),
                                      obj["metadata"]["resourceVersion"]), content_type=TABLE_TYPE.format(v=table))
            return _json(obj)
        if request.method == "PUT":
            return _json(await self.registry.update(kind, ns, name, await _read_body(request),
                                                    dry_run=_dry_run(request)))
        if request.method == "PATCH":
            obj, created = await self.registry.patch(kind, ns, name, request.content_type,
                                                     await _read_body(request), dry_run=_dry_run(request))
            return _json(obj, 201 if created else 200)
        if request.method == "DELETE":
            return _json(await self.registry.delete(kind, ns, name, await _read_body(request),
                                                    _dry_run(request)))
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "PUT", "PATCH", "DELETE"])

    async def _subresource(self, request: web.Request, path: ResourcePath) -> web.StreamResponse:
        kind, ns, name, sub, method = path.kind, path.namespace, path.name, path.subresource, request.method
        if sub == "status" and kind.kind in STATUS_SUBRESOURCE:
            if method == "GET":
                return _json(await self.registry.get(kind, ns, name))
            if method == "PUT":
                return _json(await self.registry.update(kind, ns, name, await _read_body(request), "status",
                                                        _dry_run(request)))
            if method == "PATCH":
                obj, _ = await self.registry.patch(kind, ns, name, request.content_type,
                                                   await _read_body(request), "status", _dry_run(request))
                return _json(obj)
        elif sub == "scale" and kind.kind in SCALE_SUBRESOURCE:
            if method == "GET":
                return _json(await self.registry.get_scale(kind, ns, name))
            if method in ("PUT", "PATCH"):
                content_type = request.content_type if method == "PATCH" else None
                return _json(await self.registry.update_scale(kind, ns, name, content_type,
                                                              await _read_body(request), _dry_run(request)))
        elif sub == "binding" and kind.kind == "Pod":
            if method == "POST":
                await self.registry.bind(ns, name, await _read_body(request))
                return _json(_success(201), 201)
        elif sub == "log" and kind.kind == "Pod":
            if method == "GET":
                return await self._pod_log(request, ns, name)
        elif sub in ("exec", "attach") and kind.kind == "Pod":
            if method in ("GET", "POST"):
                return await self._pod_stream(request, ns, name, sub)
        elif sub == "ephemeralcontainers" and kind.kind == "Pod":
            if method == "GET":
                return _json(await self.registry.get(kind, ns, name))
            if method == "PUT":
                return _json(await self.registry.update(kind, ns, name, await _read_body(request), sub,
                                                        _dry_run(request)))
            if method == "PATCH":
                obj, _ = await self.registry.patch(kind, ns, name, request.content_type,
                                                   await _read_body(request), sub, _dry_run(request))
                return _json(obj)
        elif sub == "portforward" and kind.kind == "Pod":
            if method in ("GET", "POST"):
                return await self._pod_port_forward(request, ns, name)
        else:
            raise path_not_found()
        raise web.HTTPMethodNotAllowed(method, ["GET", "PUT", "PATCH", "POST"])

    async def _agent_url(self, pod: dict, container: str | None, endpoint: str) -> tuple[str, str]:
        """(URL, node name) of `endpoint` (containerLogs, exec, attach) for a container of `pod`, at the
        agent of the pod's node; podlogs.LogError when there is no such place."""
        container = podlogs.container_of(pod, container)
        return await self._pod_agent_url(pod, endpoint, container)

    async def _pod_agent_url(self, pod: dict, endpoint: str, *more: str) -> tuple[str, str]:
        """(URL, node name) of /{endpoint}/{namespace}/{pod}[/more...] at the agent of the pod's node."""
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        node_name = (pod.get("spec") or {}).get("nodeName")
        if not node_name:
            raise podlogs.LogError(400, f"pod {name} does not have a host assigned")
        node = await self.registry.get(kinds.by_kind("Node"), None, node_name)
        return podlogs.agent_url(node, "/".join(["", endpoint, namespace, name, *more])), node_name

    async def _pod_log(self, request: web.Request, namespace: str, name: str) -> web.StreamResponse:
        """pods/log: passed on to the agent of the pod's node (netplane.podlogs), streamed back."""
        pod = await self.registry.get(kinds.by_kind("Pod"), namespace, name)
        try:
            query = podlogs.LogQuery.parse(request.query)
            url, _ = await self._agent_url(pod, request.query.get("container"), "containerLogs")
        except podlogs.LogError as err:
            raise _refused(err) from None
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=None if query.follow else 30)
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, \
                    session.get(url, params=query.as_query()) as upstream:
                if upstream.status != 200:
                    raise APIStatus(upstream.status, _STATUS_REASONS.get(upstream.status, "InternalError"),
                                    (await upstream.text()).strip())
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            if response.prepared:   # the agent went away mid-stream: the log just ends there
                return response
            raise APIStatus(500, "InternalError", f'Get "{url}": {err or "timeout"}') from None

    async def _pod_stream(self, request: web.Request, namespace: str, name: str, verb: str) -> web.StreamResponse:
        """pods/exec and pods/attach: the client's WebSocket relayed, message by message, to one opened
        to the agent of the pod's node (netplane.podexec). Refusals come back as plain errors, before
        any upgrade."""
        protocol = podexec.choose_protocol(request.headers.get("Sec-WebSocket-Protocol", ""))
        pod = await self.registry.get(kinds.by_kind("Pod"), namespace, name)
        try:
            if protocol is None or request.headers.get("Upgrade", "").lower() != "websocket":
                raise podexec.ExecError(400, f"Upgrade request required: {verb} speaks "
                                             f"{', '.join(podexec.PROTOCOLS)} over a WebSocket")
            wanted = podexec.ExecRequest.parse(request.query, attach=verb == "attach")
            url, node_name = await self._agent_url(pod, request.query.get("container"), verb)
        except podlogs.LogError as err:
            raise _refused(err) from None
        return await _relay_to_agent(request, url, node_name, protocol, wanted.as_query())

    async def _proxy(self, request: web.Request, namespace: str, plural: str, target_text: str) -> web.StreamResponse:
        """pods/proxy and services/proxy (netplane.apiproxy): the request relayed from here to a pod's
        address, the answer streamed back."""
        request[VERB], request[RESOURCE] = request.method.lower(), f"{plural}/proxy"
        try:
            target = apiproxy.parse_target(target_text)
            if plural == "pods":
                address = apiproxy.pod_address(await self.registry.get(kinds.by_kind("Pod"), namespace, target.name),
                                               target.port)
            else:
                service = await self.registry.get(kinds.by_kind("Service"), namespace, target.name)
                slices, _ = await self.registry.list(kinds.by_kind("EndpointSlice"), namespace,
                                                     lambda s: (s["metadata"].get("labels") or {}).get(
                                                         "kubernetes.io/service-name") == target.name)
                address = apiproxy.pick(apiproxy.service_addresses(service, slices, target.port))
        except apiproxy.ProxyError as err:
            raise APIStatus(err.status, err.reason, err.message) from None
        tail = "/" + "/".join(request.rel_url.raw_path.split("/")[8:])   # after /api/v1/namespaces/NS/KIND/NAME/proxy
        url = apiproxy.upstream_url(target.scheme, address, tail, request.query_string)
        body = await request.read()
        response = None
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
        try:   # a pod's certificate is not checked (as the kube-apiserver's proxy does not)
            async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session, \
                    session.request(request.method, url, headers=apiproxy.passed_headers(request.headers),
                                    data=body or None, allow_redirects=False, ssl=False) as upstream:
                response = web.StreamResponse(status=upstream.status, headers=apiproxy.passed_headers(upstream.headers))
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
            if response is not None and response.prepared:   # the pod went away mid-answer
                return response
            raise APIStatus(503, "ServiceUnavailable", apiproxy.unreachable(address, err)) from None

    async def _resource_metrics(self, request: web.Request, rest: list[str]) -> web.Response:
        """metrics.k8s.io/v1beta1 nodes and pods (kubectl top), from every node's agent at once."""
        namespace = rest[1] if len(rest) >= 3 and rest[0] == "namespaces" else None
        parts = rest[2:] if namespace else rest
        if not parts or parts[0] not in ("nodes", "pods") or len(parts) > 2 or (parts[0] == "nodes" and namespace):
            raise path_not_found()
        plural, name = parts[0], (parts[1] if len(parts) == 2 else None)
        request[VERB], request[RESOURCE] = ("get" if name else "list"), f"{plural}.metrics"
        if request.method != "GET":
            raise web.HTTPMethodNotAllowed(request.method, ["GET"])
        selector = Selector(request.query.get("labelSelector"), request.query.get("fieldSelector"))
        nodes, _ = await self.registry.list(kinds.by_kind("Node"))
        reports = await asyncio.gather(*(self._agent_report(n) for n in nodes))
        if plural == "nodes":
            wanted = {n["metadata"]["name"] for n in nodes if selector(n)}
            items = [m for n, r in zip(nodes, reports) if n["metadata"]["name"] in wanted
                     and (m := podmetrics.node_metrics(n["metadata"]["name"], r))]
            kind_name = "NodeMetrics"
        else:
            pods, _ = await self.registry.list(kinds.by_kind("Pod"), namespace, selector)
            wanted = {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in pods}
            items = [m for r in reports for m in podmetrics.pod_metrics(r)
                     if (m["metadata"]["namespace"], m["metadata"]["name"]) in wanted]
            kind_name = "PodMetrics"
        if name is not None:
            found = next((m for m in items if m["metadata"]["name"] == name), None)
            if found is None:
                raise APIStatus(404, "NotFound", f'{plural}.metrics.k8s.io "{name}" not found',
                                {"name": name, "group": METRICS_GROUP, "kind": plural})
            return _json(found)
        return _json({"kind": f"{kind_name}List", "apiVersion": "metrics.k8s.io/v1beta1",
                      "metadata": {}, "items": sorted(items, key=lambda m: (m["metadata"].get("namespace", ""),
                                                                            m["metadata"]["name"]))})

    @staticmethod
    async def _agent_report(node: dict) -> dict:
        """A node agent's /stats/resource; {} when it does not answer in time (its node then has no row)."""
        try:
            url = podlogs.agent_url(node, "/stats/resource")
            timeout = aiohttp.ClientTimeout(total=3)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
                return await response.json() if response.status == 200 else {}
        except (podlogs.LogError, aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return {}

    async def _pod_port_forward(self, request: web.Request, namespace: str, name: str) -> web.StreamResponse:
        """pods/portforward: the client's WebSocket (SPDY/3.1 inside, netplane.portforward) relayed to the
        agent of the pod's node. The SPDY upgrade older clients ask for (a POST) is refused in words."""
        pod = await self.registry.get(kinds.by_kind("Pod"), namespace, name)
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        try:
            url, node_name = await self._pod_agent_url(pod, "portForward")
            if portforward.PROTOCOL not in offered or request.headers.get("Upgrade", "").lower() != "websocket":
                raise podexec.ExecError(400, f"Upgrade request required: port-forward speaks {portforward.PROTOCOL} "
                                             "over a WebSocket (kubectl 1.31 and later); the SPDY upgrade is not served")
        except podlogs.LogError as err:
            raise _refused(err) from None
        return await _relay_to_agent(request, url, node_name, portforward.PROTOCOL)

    # --- watch --------------------------------------------------------------------------------

    async def _watch(self, request: web.Request, path: ResourcePath, selector: Selector) -> web.StreamResponse:
        timeout = request.query.get("timeoutSeconds")
        try:
            timeout_s = float(timeout) if timeout else None
        except ValueError:
            raise bad_request(f"invalid timeoutSeconds {timeout!r}") from None
        bookmarks = request.query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        events = self.registry.watch(path.kind, path.namespace, request.query.get("resourceVersion"),
                                     selector, bookmarks=bookmarks)
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Cache-Control": "no-cache"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        gauge = WATCHERS.labels(path.kind.plural)
        gauge.inc()
        table = negotiate_table(request.headers.get("Accept", ""))
        if table:
            events = _tables(path.kind, events, table, request.query.get("includeObject", "Metadata"))
        pump = asyncio.ensure_future(self._pump(response, events))
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({pump, stop}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when the handler is cancelled because the client went away
            for task in (pump, stop):
                task.cancel()
            await asyncio.gather(pump, stop, return_exceptions=True)
            await events.aclose()
            gauge.dec()
        try:
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return response

    @staticmethod
    async def _pump(response: web.StreamResponse, events) -> None:
        try:
            async for event_type, obj in events:
                line = json.dumps({"type": event_type, "object": obj}, separators=(",", ":"))
                await response.write(line.encode() + b"\n")
        except APIStatus as err:
            await response.write(json.dumps({"type": "ERROR", "object": err.status()}).encode() + b"\n")
        except (ConnectionError, RuntimeError):
            pass  # the client went away


async def _tables(kind: Kind, events, version: str, include_object: str):
    """Watch events whose objects are one-row Tables (kubectl get -w); columns on the first only."""
    first = True
    try:
        async for event_type, obj in events:
            if event_type in ("ADDED", "MODIFIED", "DELETED"):
                obj = as_table(kind, [obj], version, include_object,
                               obj["metadata"].get("resourceVersion", ""), with_columns=first)
                first = False
            yield event_type, obj
    finally:
        await events.aclose()


# =============================================================================================
# Bootstrap
# =============================================================================================

async def bootstrap(registry: Registry, advertise_address: str, advertise_port: int) -> None:
    """System namespaces, and Service default/kubernetes with its EndpointSlice (the API itself)."""
    for name in SYSTEM_NAMESPACES:
        await _ensure(registry, kinds.by_kind("Namespace"), None,
                      {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "kubernetes", "namespace": "default",
                            "labels": {"component": "apiserver", "provider": "kubernetes"}},
               "spec": {"type": "ClusterIP", "clusterIP": KUBERNETES_SERVICE_IP,
                        "ports": [{"name": "https", "port": 443, "protocol": "TCP",
                                   "targetPort": advertise_port}]}}
    await _ensure(registry, kinds.by_kind("Service"), "default", service)
    endpoints = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                 "metadata": {"name": "kubernetes", "namespace": "default",
                              "labels": {"kubernetes.io/service-name": "kubernetes",
                                         "endpointslice.kubernetes.io/managed-by": "netplane-apiserver"}},
                 "addressType": "IPv4",
                 "endpoints": [{"addresses": [advertise_address], "conditions": {"ready": True}}],
                 "ports": [{"name": "https", "port": advertise_port, "protocol": "TCP"}]}
    await _ensure(registry, kinds.by_kind("EndpointSlice"), "default", endpoints)
    legacy = {"apiVersion": "v1", "kind": "Endpoints",   # `kubectl get endpoints kubernetes`
              "metadata": {"name": "kubernetes", "namespace": "default",
                           "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
              "subsets": [{"addresses": [{"ip": advertise_address}],
                           "ports": [{"name": "https", "port": advertise_port, "protocol": "TCP"}]}]}
    await _ensure(registry, kinds.by_kind("Endpoints"), "default", legacy)


async def _ensure(registry: Registry, kind: Kind, namespace: str | None, wanted: dict) -> None:
    """Create `wanted`, or bring the fields it names up to date (a restart with a new address)."""
    try:
        await registry.create(kind, namespace, wanted)
        return
    except APIStatus as err:
        if err.reason != "AlreadyExists":
            raise
    patch = {k: v for k, v in wanted.items() if k not in ("metadata", "apiVersion", "kind")}
    if wanted["metadata"].get("labels"):
        patch["metadata"] = {"labels": wanted["metadata"]["labels"]}
    await registry.patch(kind, namespace, wanted["metadata"]["name"], "application/merge-patch+json", patch)


# =============================================================================================
# main
# =============================================================================================

def _guess_advertise_address(host: str) -> str:
    if host not in ("", "0.0.0.0", "::"):
        return host
    try:  # the source address a default route would use; connect() on UDP sends nothing
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="netplane apiserver",
                                     description="serve the Kubernetes API over the revisioned store")
    parser.add_argument("--listen", default="0.0.0.0:6443", help="ADDR:PORT to serve on (default 0.0.0.0:6443)")
    parser.add_argument("--store", choices=["sqlite", "etcd"], default="sqlite",
                        help="where objects live: an embedded SQLite file (default) or etcd v3")
    parser.add_argument("--db", default="/var/lib/netplane/apiserver.db", help="the SQLite store file")
    parser.add_argument("--etcd-endpoints", default="http://127.0.0.1:2379",
                        help="etcd client URLs, comma-separated (with --store etcd)")
    parser.add_argument("--advertise-address", help="the IP the kubernetes Service points at "
                        "(default: the listen address, or this host's primary address)")
    parser.add_argument("--compact-interval", type=float, default=300.0,
                        help="seconds between compactions of the watch history (default 300)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    daemon.setup_logging("apiserver", getattr(logging, args.log_level.upper()))
    host, port = daemon.split_hostport(args.listen, 6443)
    advertise = args.advertise_address or _guess_advertise_address(host)

    async def serve(stop: asyncio.Event) -> None:
        store = store_mod.open_store(args.etcd_endpoints if args.store == "etcd" else args.db, args.store)
        server = APIServer(store, advertise, port, compact_interval=args.compact_interval)
        try:
            await server.start(args.listen)
            await stop.wait()
        finally:
            await server.stop()
            await store.aclose()

    return daemon.run(serve, component="apiserver")
