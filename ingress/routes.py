"""The route table: a pure function of Ingresses, Services, EndpointSlices, IngressClasses and Secrets.

    table = build_table(view_objects)          # no I/O, no clock
    decision = table.route(host_header, path)  # -> Route (a backend, or a local status 404/503)

Matching follows Ingress v1 (networking.k8s.io/v1):
- Host: the Host header lower-cased, port and one trailing dot stripped. A precise rule host must be
  equal; `*.foo.com` matches exactly one extra label (`bar.foo.com`, not `a.bar.foo.com`, not `foo.com`).
  The most specific host decides, as in nginx server blocks and Envoy virtual hosts: a precise host,
  else a one-label wildcard, else the rules with no host. There is no fall-through between them: a
  request for a known host whose paths do not match goes to the default backend (or 404).
- Paths: `Exact` is byte-for-byte; `Prefix` is element-wise on `/` with trailing slashes ignored
  (`/foo` matches `/foo`, `/foo/`, `/foo/bar`, never `/foobar`); `ImplementationSpecific` is, in
  this implementation, a plain string prefix, as ingress-nginx has it (`/foo` matches `/foobar`
  too). Only the path before `?` is compared, case-sensitively.
- Precedence among matching paths: the longest wins (an Exact match is the whole path, so it beats
  every Prefix); for the same normalised prefix the longer written path (`/foo/` over `/foo`), then
  the oldest Ingress (creationTimestamp), then namespace/name, then rule order.
- The request path is matched normalised (normalise_path: percent-encoded unreserved characters
  decoded, dot-segments resolved, repeated slashes merged), as nginx matches its locations, so
  `/api/../admin` is matched as `/admin`; the request goes upstream exactly as it came. Rules are
  normalised already: an Exact or Prefix path with `//`, `/./`, `/../`, `%2f` or a trailing `/.`
  or `/..` is refused, as the Kubernetes API refuses it.
- No match: the `spec.defaultBackend` of the oldest Ingress that has one, else 404.
- A matched backend whose Service is missing, whose port does not resolve, or which has no ready
  endpoint answers 503; it never falls through to a shorter path.
"""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

from netplane.validation import invalid_ingress_path

OUR_CLASS = "netplane"
OUR_CONTROLLER = "netplane.io/ingress"
DEFAULT_CLASS_ANNOTATION = "ingressclass.kubernetes.io/is-default-class"
LEGACY_CLASS_ANNOTATION = "kubernetes.io/ingress.class"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PATH_TYPES = ("Exact", "Prefix", "ImplementationSpecific")


# ------------------------------------------------------------------------------------ value types

class Endpoint(NamedTuple):
    """A pod address and port. A tuple, not a dataclass: it is hashed several times per request."""
    address: str
    port: int

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


@dataclass(frozen=True)
class Backend:
    """Where a route sends traffic: a Service port resolved to ready endpoints, or why it cannot."""
    service: str                      # "namespace/name:port" for logs and metrics
    endpoints: tuple[Endpoint, ...] = ()
    problem: str = ""                 # non-empty -> answer 503 with this reason

    @property
    def usable(self) -> bool:
        return not self.problem and bool(self.endpoints)


@dataclass(frozen=True)
class Route:
    """The outcome of a lookup: `backend` set, or a local `status` (404) with a reason."""
    backend: Backend | None
    status: int = 0
    reason: str = ""
    ingress: str = ""                 # "namespace/name" of the Ingress that matched
    path: str = ""                    # the rule path that matched


NOT_FOUND = Route(None, 404, "no ingress rule matches this host and path")


@dataclass(frozen=True)
class _PathRule:
    path: str
    path_type: str                    # "Exact", "Prefix" or "ImplementationSpecific" (a string prefix)
    route: Route
    order: tuple                      # tie-breakers: smaller wins


@dataclass
class VirtualHost:
    """The paths of one host: Exact paths by path; Prefix rules by normalised prefix;
    ImplementationSpecific rules as string prefixes, longest first."""
    exact: dict[str, Route] = field(default_factory=dict)
    prefix: dict[str, Route] = field(default_factory=dict)
    plain: dict[str, Route] = field(default_factory=dict)   # in order: longest first

    def match(self, path: str) -> Route | None:
        route = self.exact.get(path)
        if route is not None:
            return route
        route, length = self._element_prefix(path) if self.prefix else (None, -1)
        for rule_path, plain_route in self.plain.items():
            if len(rule_path.rstrip("/")) <= length:
                break   # the longest match wins; on a tie, the element-wise Prefix
            if path.startswith(rule_path):
                return plain_route
        return route

    def _element_prefix(self, path: str) -> tuple[Route | None, int]:
        # Candidates are the path cut at each '/' boundary, longest first: /a/b/c, /a/b, /a, "".
        prefix = self.prefix
        candidate = path.rstrip("/") if path != "/" else ""
        while True:
            route = prefix.get(candidate)
            if route is not None:
                return route, len(candidate)
            if not candidate:
                return None, -1
            cut = candidate.rfind("/")
            candidate = candidate[:cut] if cut > 0 else ""


@dataclass(frozen=True)
class TlsCertificate:
    secret: str                       # "namespace/name"
    cert_pem: bytes
    key_pem: bytes


@dataclass
class RouteTable:
    exact_hosts: dict[str, VirtualHost] = field(default_factory=dict)
    wildcard_hosts: dict[str, VirtualHost] = field(default_factory=dict)   # "foo.com" for "*.foo.com"
    any_host: VirtualHost | None = None
    default_route: Route = NOT_FOUND
    # TLS: host pattern ("foo.bar.com" or "*.foo.com") -> certificate, from Ingress spec.tls.
    certificates: dict[str, TlsCertificate] = field(default_factory=dict)
    problems: tuple[str, ...] = ()    # objects we skipped, and why (logged by the shell)
    ingresses: tuple[str, ...] = ()   # the Ingresses we serve, "namespace/name"

    def vhost_for(self, host: str) -> VirtualHost | None:
        vhost = self.exact_hosts.get(host)
        if vhost is None and self.wildcard_hosts:
            dot = host.find(".")
            if dot > 0:
                vhost = self.wildcard_hosts.get(host[dot + 1:])
        return vhost if vhost is not None else self.any_host

    def route(self, host: str, path: str) -> Route:
        """`host`: the raw Host header (port and case are handled here); `path`: the path only."""
        vhost = self.vhost_for(normalise_host(host))
        found = vhost.match(normalise_path(path)) if vhost is not None else None
        return found if found is not None else self.default_route

    def certificate_for(self, server_name: str) -> TlsCertificate | None:
        name = normalise_host(server_name)
        cert = self.certificates.get(name)
        if cert is None:
            dot = name.find(".")
            if dot > 0:
                cert = self.certificates.get("*" + name[dot:])
        return cert


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")


def normalise_path(path: str) -> str:
    """The path a request is matched by (RFC 3986 6.2.2 and 5.2.4, with slashes merged):
    '/a/./b/../c' -> '/a/c', '//a//b' -> '/a/b', '/%61pi' -> '/api', '/a/%2e%2e/b' -> '/b'.
    Reserved characters stay encoded ('%2F' is not a '/'), with their hex digits upper-cased."""
    if "#" in path:
        path = path[:path.index("#")]   # a fragment is never part of the path (clients should not send one)
    if "%" in path:
        path = _PERCENT.sub(_decode_unreserved, path)
    if "/." not in path and "//" not in path:
        return path   # nothing to resolve: the common case
    if not path.startswith("/"):
        return path   # '*' (OPTIONS *) and the like: no segments
    segments: list[str] = []
    parts = path.split("/")
    for segment in parts[1:]:
        if segment == "..":
            if segments:
                segments.pop()
        elif segment and segment != ".":
            segments.append(segment)
    ends_in_slash = parts[-1] in ("", ".", "..")
    return "/" + "/".join(segments) + ("/" if ends_in_slash and segments else "")


def _decode_unreserved(match: re.Match) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def published_status(ingresses: Iterable[dict], served: Iterable[str], service: dict | None) -> list[tuple]:
    """(namespace, name, status) for each Ingress we serve whose status.loadBalancer does not show
    the addresses of our own Service (`--publish-service`, as ingress-nginx has it): where users look
    (`kubectl get ingress`, ADDRESS) to find us. Nothing while that Service has no address yet."""
    addresses = [{k: v for k, v in entry.items() if k in ("ip", "hostname")}
                 for entry in ((service or {}).get("status") or {}).get("loadBalancer", {}).get("ingress") or []]
    addresses = [a for a in addresses if a]
    if not addresses:
        return []
    wanted = {"loadBalancer": {"ingress": addresses}}
    ours = set(served)
    out = []
    for ing in ingresses:
        meta = ing.get("metadata") or {}
        ref = f"{meta.get('namespace') or 'default'}/{meta.get('name', '')}"
        if ref in ours and (ing.get("status") or {}).get("loadBalancer", {}).get("ingress") != addresses:
            out.append((meta.get("namespace") or "default", meta.get("name", ""), wanted))
    return out


def normalise_host(host: str) -> str:
    """'Foo.COM:8080' -> 'foo.com'; '[::1]:80' -> '[::1]'; 'foo.com.' -> 'foo.com'."""
    if host.startswith("["):
        end = host.find("]")
        host = host[:end + 1] if end > 0 else host
    else:
        colon = host.find(":")
        if colon >= 0:
            host = host[:colon]
    host = host.lower()
    return host[:-1] if host.endswith(".") else host


def prefix_matches(rule: str, path: str) -> bool:
    """The Prefix rule on its own (the table uses an equivalent dict walk)."""
    r = rule.rstrip("/")
    return r == "" or path == r or path.startswith(r + "/")


# ------------------------------------------------------------------------------------ inputs

@dataclass(frozen=True)
class Objects:
    """The inputs, as lists of wire-shaped dicts."""
    ingresses: tuple[dict, ...] = ()
    services: tuple[dict, ...] = ()
    endpoint_slices: tuple[dict, ...] = ()
    ingress_classes: tuple[dict, ...] = ()
    secrets: tuple[dict, ...] = ()

    @classmethod
    def from_list(cls, objects: Iterable[dict]) -> "Objects":
        by_kind: dict[str, list[dict]] = {}
        for obj in objects:
            by_kind.setdefault(obj.get("kind", ""), []).append(obj)
        return cls(tuple(by_kind.get("Ingress", ())), tuple(by_kind.get("Service", ())),
                   tuple(by_kind.get("EndpointSlice", ())), tuple(by_kind.get("IngressClass", ())),
                   tuple(by_kind.get("Secret", ())))


def _meta(obj: dict) -> dict:
    return obj.get("metadata") or {}


def _ref(obj: dict) -> str:
    meta = _meta(obj)
    return f"{meta.get('namespace') or 'default'}/{meta.get('name', '')}"


# ------------------------------------------------------------------------------------ class filter

@dataclass(frozen=True)
class ClassPolicy:
    """Which Ingresses are ours: by spec.ingressClassName, else the legacy annotation, else the
    default IngressClass; an Ingress with no class at all is ours unless another controller's class
    is marked default."""
    class_name: str = OUR_CLASS
    controller: str = OUR_CONTROLLER

    def our_classes(self, classes: Iterable[dict]) -> tuple[set[str], str | None]:
        """(names of IngressClasses that are ours, the default class name or None)."""
        ours = {self.class_name}
        default = None
        for cls in sorted(classes, key=lambda c: _meta(c).get("creationTimestamp") or ""):
            name = _meta(cls).get("name", "")
            controller = (cls.get("spec") or {}).get("controller")
            if controller == self.controller:
                ours.add(name)
            elif name == self.class_name and controller:
                ours.discard(name)  # our name is taken by another controller's class
            annotations = _meta(cls).get("annotations") or {}
            if str(annotations.get(DEFAULT_CLASS_ANNOTATION, "")).lower() == "true" and default is None:
                default = name
        return ours, default

    def is_ours(self, ingress: dict, ours: set[str], default: str | None) -> bool:
        spec = ingress.get("spec") or {}
        annotations = _meta(ingress).get("annotations") or {}
        name = spec.get("ingressClassName") or annotations.get(LEGACY_CLASS_ANNOTATION)
        if name:
            return name in ours
        return default is None or default in ours


# ------------------------------------------------------------------------------------ backends

class _ServiceIndex:
    """Services by (ns, name) and ready endpoints by (ns, service name, port name)."""

    def __init__(self, services: Iterable[dict], slices: Iterable[dict]):
        self.services = {(_meta(s).get("namespace") or "default", _meta(s).get("name", "")): s
                         for s in services}
        self.slices: dict[tuple[str, str], list[dict]] = {}
        for es in slices:
            owner = (_meta(es).get("labels") or {}).get(SERVICE_NAME_LABEL)
            if owner:
                self.slices.setdefault((_meta(es).get("namespace") or "default", owner), []).append(es)

    def backend(self, namespace: str, service_backend: dict) -> Backend:
        name = service_backend.get("name", "")
        port_ref = service_backend.get("port") or {}
        port_text = str(port_ref.get("number") or port_ref.get("name") or "?")
        label = f"{namespace}/{name}:{port_text}"
        svc = self.services.get((namespace, name))
        if svc is None:
            return Backend(label, problem=f"service {namespace}/{name} not found")
        service_port = _find_service_port(svc, port_ref)
        if service_port is None:
            return Backend(label, problem=f"service {namespace}/{name} has no port {port_text}")
        endpoints = self._ready_endpoints(namespace, name, service_port)
        if not endpoints:
            return Backend(label, problem=f"service {namespace}/{name} has no ready endpoints")
        return Backend(label, endpoints)

    def _ready_endpoints(self, namespace: str, name: str, service_port: dict) -> tuple[Endpoint, ...]:
        port_name = service_port.get("name") or ""
        target = service_port.get("targetPort", service_port.get("port"))
        found: set[Endpoint] = set()
        for es in self.slices.get((namespace, name), ()):
            if es.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
                continue  # FQDN slices are not addresses we can connect to
            port = _slice_port(es, port_name, target)
            if port is None:
                continue
            for ep in es.get("endpoints") or []:
                conditions = ep.get("conditions") or {}
                if conditions.get("ready") is False or not ep.get("addresses"):
                    continue  # a missing ready condition means ready (EndpointSlice API)
                found.add(Endpoint(ep["addresses"][0], port))
        return tuple(sorted(found, key=lambda e: (e.address, e.port)))


def _find_service_port(svc: dict, port_ref: dict) -> dict | None:
    ports = (svc.get("spec") or {}).get("ports") or []
    if "number" in port_ref:
        return next((p for p in ports if p.get("port") == port_ref["number"]), None)
    if "name" in port_ref:
        return next((p for p in ports if p.get("name") == port_ref["name"]), None)
    return ports[0] if len(ports) == 1 else None


def _slice_port(es: dict, port_name: str, target) -> int | None:
    """The endpoint port for the Service port named `port_name`; a slice with no ports listed falls
    back to a numeric targetPort (hand-written slices in offline files often omit them)."""
    ports = es.get("ports")
    if ports:
        for p in ports:
            if (p.get("name") or "") == port_name and isinstance(p.get("port"), int):
                return p["port"]
        return None
    return target if isinstance(target, int) else None


# ------------------------------------------------------------------------------------ the build

def build_table(objects: Objects, policy: ClassPolicy = ClassPolicy()) -> RouteTable:
    ours, default_class = policy.our_classes(objects.ingress_classes)
    ingresses = sorted((i for i in objects.ingresses if policy.is_ours(i, ours, default_class)),
                       key=_age_key)
    index = _ServiceIndex(objects.services, objects.endpoint_slices)
    secrets = {(_meta(s).get("namespace") or "default", _meta(s).get("name", "")): s
               for s in objects.secrets}
    rules_by_host: dict[str, list[_PathRule]] = {}
    problems: list[str] = []
    default_route: Route | None = None
    certificates: dict[str, TlsCertificate] = {}
    for rank, ing in enumerate(ingresses):
        namespace = _meta(ing).get("namespace") or "default"
        ref = _ref(ing)
        spec = ing.get("spec") or {}
        for rule_index, rule in enumerate(spec.get("rules") or []):
            host = str(rule.get("host") or "").lower().rstrip(".")
            paths = ((rule.get("http") or {}).get("paths")) or []
            for path_index, p in enumerate(paths):
                where = f"ingress {ref}: spec.rules[{rule_index}].http.paths[{path_index}]"
                made = _path_rule(p, namespace, ref, index, (rank, rule_index, path_index), where)
                if isinstance(made, str):
                    problems.append(made)
                else:
                    rules_by_host.setdefault(host, []).append(made)
        if default_route is None and spec.get("defaultBackend"):
            backend = _backend(spec["defaultBackend"], namespace, index)
            if isinstance(backend, str):
                problems.append(f"ingress {ref}: spec.defaultBackend: {backend}")
            else:
                default_route = Route(backend, ingress=ref, path="(default backend)")
        _add_certificates(ing, namespace, ref, secrets, certificates, problems)
    table = RouteTable(default_route=default_route or NOT_FOUND, certificates=certificates,
                       problems=tuple(problems), ingresses=tuple(_ref(i) for i in ingresses))
    for host, rules in rules_by_host.items():
        vhost = _vhost(rules)
        if not host:
            table.any_host = vhost
        elif host.startswith("*."):
            table.wildcard_hosts[host[2:]] = vhost
        else:
            table.exact_hosts[host] = vhost
    return table


def _age_key(ing: dict) -> tuple:
    meta = _meta(ing)
    return (meta.get("creationTimestamp") or "", meta.get("namespace") or "default", meta.get("name", ""))


def _backend(spec_backend: dict, namespace: str, index: _ServiceIndex) -> Backend | str:
    service = spec_backend.get("service")
    if service:
        if not service.get("name"):
            return "service.name is missing"
        return index.backend(namespace, service)
    if spec_backend.get("resource"):
        return Backend(f"{namespace}/resource", problem="resource backends are not supported")
    return "no service backend given"


def _path_rule(p: dict, namespace: str, ref: str, index: _ServiceIndex, order: tuple,
               where: str) -> _PathRule | str:
    path = p.get("path") or "/"
    path_type = p.get("pathType") or "ImplementationSpecific"
    if path_type not in PATH_TYPES:
        return f"{where}.pathType: {path_type!r} is not one of {', '.join(PATH_TYPES)}"
    if not path.startswith("/"):
        return f"{where}.path: {path!r} must start with '/'"
    reason = invalid_ingress_path(path) if path_type != "ImplementationSpecific" else None
    if reason:
        return f"{where}.path: {path!r} {reason}"
    backend = _backend(p.get("backend") or {}, namespace, index)
    if isinstance(backend, str):
        return f"{where}.backend: {backend}"
    # Matched as requests are: a rule written '/%61pi' is the rule '/api'.
    return _PathRule(normalise_path(path), path_type, Route(backend, ingress=ref, path=path), order)


def _vhost(rules: list[_PathRule]) -> VirtualHost:
    vhost = VirtualHost()
    # For one key, the longer written path wins, then the oldest Ingress and rule order: sort so the
    # winner comes first and let setdefault keep it.
    for rule in sorted(rules, key=lambda r: (-len(r.path), r.order)):
        if rule.path_type == "Exact":
            vhost.exact.setdefault(rule.path, rule.route)
        elif rule.path_type == "Prefix":
            vhost.prefix.setdefault(rule.path.rstrip("/"), rule.route)
        else:
            vhost.plain.setdefault(rule.path, rule.route)
    return vhost


def _add_certificates(ing: dict, namespace: str, ref: str, secrets: dict, out: dict,
                      problems: list[str]) -> None:
    for i, tls in enumerate((ing.get("spec") or {}).get("tls") or []):
        name = tls.get("secretName")
        if not name:
            continue
        cert = _certificate(secrets.get((namespace, name)), f"{namespace}/{name}")
        if isinstance(cert, str):
            problems.append(f"ingress {ref}: spec.tls[{i}].secretName: {cert}")
            continue
        for host in tls.get("hosts") or []:
            out.setdefault(str(host).lower().rstrip("."), cert)  # the oldest Ingress keeps a host


def _certificate(secret: dict | None, ref: str) -> TlsCertificate | str:
    if secret is None:
        return f"secret {ref} not found"
    data = secret.get("data") or {}
    string_data = secret.get("stringData") or {}
    try:
        cert = _secret_value(data, string_data, "tls.crt")
        key = _secret_value(data, string_data, "tls.key")
    except (binascii.Error, ValueError) as err:
        return f"secret {ref}: {err}"
    if not cert or not key:
        return f"secret {ref} has no tls.crt and tls.key"
    return TlsCertificate(ref, cert, key)


def _secret_value(data: dict, string_data: dict, key: str) -> bytes:
    if key in string_data:
        return str(string_data[key]).encode()
    if key in data:
        try:
            return base64.b64decode(data[key], validate=True)
        except binascii.Error:
            raise ValueError(f"data.{key} is not valid base64") from None
    return b""
