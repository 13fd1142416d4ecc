"""The resource table: every kind the API server serves, and how its REST path is built.

One table shared by the API server (routes, discovery), the client (paths), and the CLI
(`netplane get svc`). Adding a kind here is the only step needed to serve it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    kind: str
    group: str  # "" for the core group
    version: str
    plural: str
    namespaced: bool
    short_names: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def prefix(self) -> str:
        """The group/version part of the REST path: /api/v1 or /apis/apps/v1."""
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    def path(self, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        """REST path for a collection (name None) or one object; namespace None lists across all."""
        parts = [self.prefix]
        if self.namespaced and namespace:
            parts.append(f"/namespaces/{namespace}")
        parts.append(f"/{self.plural}")
        if name:
            parts.append(f"/{name}")
            if subresource:
                parts.append(f"/{subresource}")
        return "".join(parts)


KINDS: tuple[Kind, ...] = (
    Kind("Namespace", "", "v1", "namespaces", False, ("ns",)),
    Kind("Node", "", "v1", "nodes", False, ("no",)),
    Kind("Pod", "", "v1", "pods", True, ("po",)),
    Kind("Service", "", "v1", "services", True, ("svc",)),
    Kind("Secret", "", "v1", "secrets", True, ()),
    Kind("ConfigMap", "", "v1", "configmaps", True, ("cm",)),
    Kind("ServiceAccount", "", "v1", "serviceaccounts", True, ("sa",)),
    Kind("Event", "", "v1", "events", True, ("ev",)),
    Kind("Endpoints", "", "v1", "endpoints", True, ("ep",)),
    Kind("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices", True, ()),
    Kind("Deployment", "apps", "v1", "deployments", True, ("deploy",)),
    Kind("ReplicaSet", "apps", "v1", "replicasets", True, ("rs",)),
    Kind("DaemonSet", "apps", "v1", "daemonsets", True, ("ds",)),
    Kind("StatefulSet", "apps", "v1", "statefulsets", True, ("sts",)),
    Kind("Job", "batch", "v1", "jobs", True, ()),
    Kind("CronJob", "batch", "v1", "cronjobs", True, ("cj",)),
    Kind("Ingress", "networking.k8s.io", "v1", "ingresses", True, ("ing",)),
    Kind("IngressClass", "networking.k8s.io", "v1", "ingressclasses", False, ()),
)

_BY_KIND = {k.kind: k for k in KINDS}
_BY_PATH = {(k.group, k.version, k.plural): k for k in KINDS}


class UnknownKind(LookupError):
    pass


def by_kind(kind: str, api_version: str | None = None) -> Kind:
    """The Kind for an object's `kind` (and, when given, check its apiVersion matches)."""
    found = _BY_KIND.get(kind)
    if found is None:
        raise UnknownKind(f"unknown kind {kind!r}; known kinds: {', '.join(sorted(_BY_KIND))}")
    if api_version is not None and api_version != found.api_version:
        raise UnknownKind(f"kind {kind!r} is served as apiVersion {found.api_version!r}, not {api_version!r}")
    return found


def by_path(group: str, version: str, plural: str) -> Kind | None:
    return _BY_PATH.get((group, version, plural))


def lookup(name: str) -> Kind:
    """What a user types on the command line: 'pods', 'pod', 'po', 'Pod', 'svc', 'deployments.apps'."""
    wanted = name.lower().split(".", 1)[0]
    for k in KINDS:
        if wanted in (k.plural, k.singular, *k.short_names):
            return k
    raise UnknownKind(f"the server doesn't have a resource type {name!r}")


def of(obj: dict) -> Kind:
    return by_kind(obj.get("kind", ""), obj.get("apiVersion"))
