"""The API server's proxy to pods and Services: `/api/v1/namespaces/NS/pods/NAME[:PORT]/proxy/PATH` and
`.../services/[https:]NAME[:PORT]/proxy/PATH` (what `kubectl proxy` users open in a browser, and
`kubectl get --raw`): the request goes from the API server to a pod's address on the pod network, and
the answer comes back. For a Service, one of its ready endpoints is picked, as the kube-apiserver does
(no kube-proxy on the way: the API server dials the pod itself).

Pure: which address a name and port lead to. The HTTP relay is in apiserver.py. Links inside proxied
pages are not rewritten (the kube-apiserver rewrites HTML); relative links work, absolute ones do not.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

SCHEMES = ("http", "https")
# Not passed either way (RFC 9110 7.6.1), nor the client's credentials for the API server.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "host", "authorization", "content-length"})


class ProxyError(Exception):
    """Why a proxy request cannot go anywhere: an HTTP status, a Kubernetes reason and words."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass(frozen=True)
class Target:
    scheme: str
    name: str
    port: str   # as given: a number, a port name, or "" (the default)


def parse_target(text: str) -> Target:
    """`name`, `name:port`, `scheme:name:port` (kube-apiserver's ResourceLocation forms)."""
    parts = text.split(":")
    if len(parts) == 3 and parts[0] in SCHEMES:
        return Target(parts[0], parts[1], parts[2])
    if len(parts) == 2 and parts[0] in SCHEMES and parts[1]:
        return Target(parts[0], parts[1], "")
    if len(parts) <= 2 and parts[0]:
        return Target("http", parts[0], parts[1] if len(parts) == 2 else "")
    raise ProxyError(400, "BadRequest", f"invalid proxy target {text!r}: expected [scheme:]name[:port]")


def pod_address(pod: dict, port: str) -> tuple[str, int]:
    """(pod IP, port): a number, a container port's name, or the first container port (80 when the
    pod declares none)."""
    ip = (pod.get("status") or {}).get("podIP")
    name = pod["metadata"]["name"]
    if not ip:
        raise ProxyError(503, "ServiceUnavailable", f"address not allowed: pod {name} has no IP address yet")
    declared = [p for c in (pod.get("spec") or {}).get("containers") or [] for p in c.get("ports") or []]
    if port.isdigit():
        return ip, int(port)
    if not port:
        return ip, declared[0].get("containerPort", 80) if declared else 80
    for entry in declared:
        if entry.get("name") == port:
            return ip, entry["containerPort"]
    raise ProxyError(400, "BadRequest", f'pod {name} has no container port named "{port}"')


def service_addresses(service: dict, slices: list[dict], port: str) -> list[tuple[str, int]]:
    """Every (ready endpoint IP, target port) behind the Service's port (by name or number; "" is its
    first port), from its EndpointSlices."""
    name = service["metadata"]["name"]
    ports = (service.get("spec") or {}).get("ports") or []
    chosen = next((p for p in ports if not port or port in (p.get("name"), str(p.get("port")))), None)
    if chosen is None:
        raise ProxyError(503, "ServiceUnavailable", f'no endpoints available for service "{name}:{port}"')
    addresses = []
    for eps in slices:
        target = next((p.get("port") for p in eps.get("ports") or [] if p.get("name", "") == chosen.get("name", "")),
                      None)
        if target is None:
            continue
        for endpoint in eps.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready", True):
                addresses += [(a, target) for a in endpoint.get("addresses") or []]
    if not addresses:
        raise ProxyError(503, "ServiceUnavailable", f'no endpoints available for service "{name}"')
    return sorted(addresses)


def pick(addresses: list[tuple[str, int]]) -> tuple[str, int]:
    return random.choice(addresses)


def upstream_url(scheme: str, address: tuple[str, int], path: str, query: str) -> str:
    ip, port = address
    host = f"[{ip}]" if ":" in ip else ip
    return f"{scheme}://{host}:{port}{path or '/'}{'?' + query if query else ''}"


def unreachable(address: tuple[str, int], err: Exception) -> str:
    """The kube-apiserver's words for a pod that did not answer."""
    ip, port = address
    cause = getattr(err, "os_error", None) or err
    if isinstance(cause, OSError) and cause.errno:
        why = os.strerror(cause.errno).lower()
    else:
        why = str(cause) or "i/o timeout"
    return f"error trying to reach service: dial tcp {ip}:{port}: connect: {why}"


def passed_headers(headers) -> list[tuple[str, str]]:
    """The headers that go on through the proxy (either way)."""
    connection = {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}
    return [(k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP and k.lower() not in connection]
