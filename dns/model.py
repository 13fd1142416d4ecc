"""The DNS server's view of the API objects: small frozen values, converted once from wire dicts.

Only what DNS needs survives the conversion (names, IPs, ports, readiness, hostnames), so the zone
builder never touches raw dicts and a malformed object is skipped with a reason instead of crashing
the build.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from netplane.objects import name_of, namespace_of

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TOLERATE_UNREADY = "service.alpha.kubernetes.io/tolerate-unready-endpoints"


@dataclass(frozen=True)
class Port:
    name: str  # "" when unnamed (no `_name._proto` SRV record, as the spec says)
    protocol: str  # "tcp" / "udp" / "sctp", lower case as it appears in SRV owner names
    port: int


@dataclass(frozen=True)
class Endpoint:
    """One address of an EndpointSlice endpoint (an endpoint with two addresses gives two)."""
    ip: str
    hostname: str  # the endpoint's label under its service: `hostname` field, else the dashed IP
    ready: bool


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]  # empty for headless and ExternalName
    headless: bool
    external_name: str  # "" unless type ExternalName
    ports: tuple[Port, ...]
    publish_not_ready: bool
    endpoints: tuple[Endpoint, ...] = ()
    endpoint_ports: tuple[Port, ...] = ()  # target ports, from the EndpointSlices (headless SRV)


@dataclass(frozen=True)
class Objects:
    """Everything the zone is computed from."""
    services: tuple[Service, ...]
    namespaces: frozenset[str]
    skipped: tuple[str, ...] = field(default=())  # "Service ns/name: why", for the log


def dashed(ip: str) -> str:
    """The name CoreDNS gives an endpoint without a hostname: 10-0-0-1, 5678-abcd--1 (a trailing
    '-' gets a '0' so the label does not end in a hyphen)."""
    text = ip.replace(".", "-").replace(":", "-")
    return text + "0" if text.endswith("-") else text


def _ports(raw: list | None, where: str) -> tuple[Port, ...]:
    ports = []
    for index, item in enumerate(raw or []):
        if not isinstance(item, dict):
            raise ValueError(f"{where}.ports[{index}]: expected a mapping")
        number = item.get("port")
        if number is None:  # an EndpointSlice port may omit the number ("all ports")
            continue
        if not isinstance(number, int) or not 0 < number < 65536:
            raise ValueError(f"{where}.ports[{index}].port: {number!r} is not a port number")
        ports.append(Port(str(item.get("name") or ""), str(item.get("protocol") or "TCP").lower(), number))
    return tuple(ports)


def _ips(values: list, where: str) -> tuple[str, ...]:
    ips = []
    for value in values:
        try:
            ips.append(str(ipaddress.ip_address(value)))
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not an IP address") from None
    return tuple(ips)


def _service(obj: dict) -> Service:
    where = "spec"
    spec = obj.get("spec") or {}
    svc_type = spec.get("type") or "ClusterIP"
    cluster_ip = spec.get("clusterIP") or ""
    headless = cluster_ip == "None"
    raw_ips = spec.get("clusterIPs") or ([cluster_ip] if cluster_ip else [])
    ips = ()
    if not headless and svc_type != "ExternalName":
        ips = _ips([i for i in raw_ips if i != "None"], f"{where}.clusterIPs")
    annotations = obj.get("metadata", {}).get("annotations") or {}
    return Service(
        namespace=(namespace_of(obj) or "default").lower(),  # DNS names compare without case
        name=name_of(obj).lower(),
        cluster_ips=ips,
        headless=headless and svc_type != "ExternalName",
        external_name=str(spec.get("externalName") or "").rstrip(".").lower() if svc_type == "ExternalName" else "",
        ports=_ports(spec.get("ports"), where),
        publish_not_ready=bool(spec.get("publishNotReadyAddresses"))
        or str(annotations.get(TOLERATE_UNREADY, "")).lower() == "true",
    )


def _slice_endpoints(obj: dict) -> tuple[list[Endpoint], tuple[Port, ...]]:
    endpoints = []
    for index, item in enumerate(obj.get("endpoints") or []):
        where = f"endpoints[{index}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a mapping")
        ips = _ips(item.get("addresses") or [], f"{where}.addresses")
        # EndpointSlice semantics: an unknown readiness (no condition) counts as ready.
        ready = (item.get("conditions") or {}).get("ready") is not False
        hostname = str(item.get("hostname") or "").lower()
        for ip in ips:
            endpoints.append(Endpoint(ip, hostname or dashed(ip), ready))
    return endpoints, _ports(obj.get("ports"), "")


def _where(obj: dict) -> str:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return "(metadata is not a mapping)"
    return f"{meta.get('namespace') or 'default'}/{meta.get('name') or '?'}"


def _reason(err: Exception) -> str:
    """ValueErrors name the field already; a wrong type is reported as such."""
    return str(err) if isinstance(err, ValueError) else f"a field has the wrong type ({err})"


def from_objects(objects: list[dict]) -> Objects:
    """Services (with their endpoints attached) and namespace names from API objects of any kind."""
    services: dict[tuple[str, str], Service] = {}
    skipped: list[str] = []
    for obj in objects:
        if obj.get("kind") == "Service":
            try:
                svc = _service(obj)
            except (ValueError, TypeError, AttributeError) as err:
                skipped.append(f"Service {_where(obj)}: {_reason(err)}")
                continue
            if svc.name:
                services[(svc.namespace, svc.name)] = svc
    endpoints: dict[tuple[str, str], list[Endpoint]] = {}
    endpoint_ports: dict[tuple[str, str], list[Port]] = {}
    for obj in objects:
        if obj.get("kind") != "EndpointSlice":
            continue
        try:
            owner = (obj.get("metadata", {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
            key = ((namespace_of(obj) or "default").lower(), str(owner).lower())
            if key not in services:
                continue
            eps, ports = _slice_endpoints(obj)
        except (ValueError, TypeError, AttributeError) as err:
            skipped.append(f"EndpointSlice {_where(obj)}: {_reason(err)}")
            continue
        endpoints.setdefault(key, []).extend(eps)
        known = endpoint_ports.setdefault(key, [])
        known.extend(p for p in ports if p not in known)
    attached = tuple(
        Service(**{**svc.__dict__, "endpoints": tuple(dict.fromkeys(endpoints.get(key, []))),
                   "endpoint_ports": tuple(endpoint_ports.get(key, ()))})
        for key, svc in sorted(services.items())
    )
    namespaces = {name_of(o) for o in objects
                  if o.get("kind") == "Namespace" and isinstance(o.get("metadata"), dict) and name_of(o)}
    namespaces |= {svc.namespace for svc in attached}
    return Objects(attached, frozenset(namespaces), tuple(skipped))
