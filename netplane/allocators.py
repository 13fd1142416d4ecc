"""ClusterIP and NodePort allocation for Services (pure: no I/O; the API server owns the instances).

Both follow Kubernetes: a small "static band" at the bottom of the range is left for addresses
and ports users pick themselves (kubernetes 10.96.0.1, kube-dns 10.96.0.10, a NodePort 30080 in
a manifest), and automatic allocation takes from above it first, moving a cursor forward so a
just-released value is not handed out again at once.

The state is rebuilt at API server start from the stored Services (`Allocators.rebuild`).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Callable

SERVICE_CIDR = "10.96.0.0/12"
RESERVED_IPS = ("10.96.0.1", "10.96.0.10")  # kubernetes, kube-dns: only by explicit request
NODE_PORT_RANGE = (30000, 32767)


class AllocationError(ValueError):
    """A requested value cannot be had; `field` is its path, `message` says why (k8s wording)."""

    def __init__(self, field: str, value, message: str):
        super().__init__(f"{field}: Invalid value: {value!r}: {message}")
        self.field = field
        self.value = value
        self.message = message


def static_band(size: int, minimum: int, maximum: int, divisor: int) -> int:
    """Kubernetes' size of the low band kept for user-chosen values."""
    return min(max(minimum, size // divisor), maximum)


@dataclass
class RangeAllocator:
    """Integers in [first, last]; automatic picks start above the static band and wrap."""
    first: int
    last: int
    band: int = 0                      # how many values at the bottom auto-allocation avoids first
    skip: Callable[[int], bool] = lambda value: False  # never auto-allocated, may be requested
    used: set = field(default_factory=set)
    cursor: int = -1

    def __post_init__(self):
        if self.cursor < 0:
            self.cursor = self.first + self.band

    def contains(self, value: int) -> bool:
        return self.first <= value <= self.last

    def take(self, value: int) -> bool:
        """Mark `value` used; False if it already was (the caller reports the clash)."""
        if value in self.used:
            return False
        self.used.add(value)
        return True

    def allocate(self) -> int | None:
        """The next free value, dynamic band first, then the static band; None when full."""
        dynamic = range(self.first + self.band, self.last + 1)
        for value in _rotate(dynamic, self.cursor):
            if value not in self.used and not self.skip(value):
                self.used.add(value)
                self.cursor = value + 1 if value < self.last else self.first + self.band
                return value
        for value in range(self.first, self.first + self.band):
            if value not in self.used and not self.skip(value):
                self.used.add(value)
                return value
        return None

    def release(self, value: int) -> None:
        self.used.discard(value)


def _rotate(values: range, start: int):
    """`values` beginning at `start` and wrapping around."""
    if start not in values:
        start = values.start
    yield from range(start, values.stop)
    yield from range(values.start, start)


class ClusterIPAllocator:
    def __init__(self, cidr: str = SERVICE_CIDR, reserved: tuple[str, ...] = RESERVED_IPS):
        self.network = ipaddress.ip_network(cidr)
        first = int(self.network.network_address) + 1
        last = int(self.network.broadcast_address) - 1
        reserved_values = frozenset(int(ipaddress.ip_address(ip)) for ip in reserved)

        def skip(value: int) -> bool:
            # x.y.z.0 and x.y.z.255 are valid hosts in a /12 but look wrong to people: skip them.
            return value in reserved_values or value & 0xFF in (0, 255)

        self._range = RangeAllocator(first, last, band=static_band(last - first + 1, 16, 256, 16),
                                     skip=skip)

    def allocate(self) -> str:
        value = self._range.allocate()
        if value is None:
            raise AllocationError("spec.clusterIP", "", f"range is full: no free IP in {self.network}")
        return str(ipaddress.ip_address(value))

    def allocate_specific(self, ip: str, field_path: str = "spec.clusterIP") -> str:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            raise AllocationError(field_path, ip, "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)") from None
        value = int(address)
        if address.version != 4 or not self._range.contains(value):
            raise AllocationError(field_path, ip, "provided IP is not in the valid range. "
                                  f"The range of valid IPs is {self.network}")
        if not self._range.take(value):
            raise AllocationError(field_path, ip, "provided IP is already allocated")
        return str(address)

    def release(self, ip: str) -> None:
        try:
            self._range.release(int(ipaddress.ip_address(ip)))
        except ValueError:
            pass

    def in_use(self) -> set[str]:
        return {str(ipaddress.ip_address(v)) for v in self._range.used}


class NodePortAllocator:
    def __init__(self, first: int = NODE_PORT_RANGE[0], last: int = NODE_PORT_RANGE[1]):
        self._range = RangeAllocator(first, last, band=static_band(last - first + 1, 16, 128, 32))

    @property
    def first(self) -> int:
        return self._range.first

    @property
    def last(self) -> int:
        return self._range.last

    def allocate(self, field_path: str = "spec.ports[0].nodePort") -> int:
        value = self._range.allocate()
        if value is None:
            raise AllocationError(field_path, 0, f"range is full: no free port in {self.first}-{self.last}")
        return value

    def allocate_specific(self, port: int, field_path: str) -> int:
        if not self._range.contains(port):
            raise AllocationError(field_path, port, "provided port is not in the valid range. "
                                  f"The range of valid ports is {self.first}-{self.last}")
        if not self._range.take(port):
            raise AllocationError(field_path, port, "provided port is already allocated")
        return port

    def release(self, port: int) -> None:
        self._range.release(port)

    def in_use(self) -> set[int]:
        return set(self._range.used)


def wants_cluster_ip(service: dict) -> bool:
    spec = service.get("spec") or {}
    return spec.get("type", "ClusterIP") != "ExternalName" and spec.get("clusterIP") != "None"


def wants_node_ports(service: dict) -> bool:
    return (service.get("spec") or {}).get("type") in ("NodePort", "LoadBalancer")


def _port_key(port: dict) -> tuple:
    return port.get("port"), port.get("protocol", "TCP")


class Allocators:
    """Both allocators, applied to whole Services: what the API server calls on create/update/delete.

    assign() returns a new spec dict with clusterIP(s)/nodePorts filled in, or raises
    AllocationError naming the field; on error nothing stays allocated.
    """

    def __init__(self, cluster_ips: ClusterIPAllocator | None = None,
                 node_ports: NodePortAllocator | None = None):
        self.cluster_ips = cluster_ips or ClusterIPAllocator()
        self.node_ports = node_ports or NodePortAllocator()

    def assign(self, service: dict, old: dict | None = None) -> dict:
        """The Service with addresses/ports allocated; `old` is the stored version on update.

        Values the old version already holds are kept (and not re-taken); the caller calls
        commit_release(old, new) once the new version is stored, to free what was dropped.
        """
        spec = dict(service.get("spec") or {})
        old_spec = (old or {}).get("spec") or {}
        undo: list = []
        try:
            self._assign_cluster_ip(service, spec, old_spec, undo)
            self._assign_node_ports(service, spec, old_spec, undo)
        except AllocationError:
            for release in reversed(undo):
                release()
            raise
        return {**service, "spec": spec}

    def _assign_cluster_ip(self, service: dict, spec: dict, old_spec: dict, undo: list) -> None:
        if spec.get("type") != "ExternalName":
            self._assign_ip_families(spec)
        if not wants_cluster_ip(service):
            if spec.get("clusterIP") != "None":
                spec.pop("clusterIP", None)
                spec.pop("clusterIPs", None)
            else:
                spec["clusterIPs"] = ["None"]
            return
        wanted = spec.get("clusterIP") or ""
        held = old_spec.get("clusterIP") or ""
        if held and held != "None" and wanted in ("", held):
            ip = held
        elif wanted:
            ip = self.cluster_ips.allocate_specific(wanted)
            undo.append(lambda: self.cluster_ips.release(ip))
        else:
            ip = self.cluster_ips.allocate()
            undo.append(lambda: self.cluster_ips.release(ip))
        spec["clusterIP"] = ip
        spec["clusterIPs"] = [ip]

    def _assign_ip_families(self, spec: dict) -> None:
        """ipFamilyPolicy and ipFamilies defaulted as Kubernetes does on a single-stack cluster (the
        family of the service CIDR); asking for the other family, or for both, is refused in its words."""
        family = f"IPv{self.cluster_ips.network.version}"
        policy = spec.get("ipFamilyPolicy") or "SingleStack"
        if policy == "RequireDualStack":
            raise AllocationError("spec.ipFamilyPolicy", policy, "this cluster is not configured for dual-stack services")
        for index, wanted in enumerate(spec.get("ipFamilies") or []):
            if wanted != family:
                raise AllocationError(f"spec.ipFamilies[{index}]", wanted, "not configured on this cluster")
        spec["ipFamilyPolicy"] = policy
        spec["ipFamilies"] = [family]

    def _assign_node_ports(self, service: dict, spec: dict, old_spec: dict, undo: list) -> None:
        ports = [dict(p) for p in spec.get("ports") or []]
        if not wants_node_ports(service):
            for port in ports:
                port.pop("nodePort", None)
            if ports:
                spec["ports"] = ports
            return
        held = {}
        if old_spec.get("type") in ("NodePort", "LoadBalancer"):
            held = {_port_key(p): p["nodePort"] for p in old_spec.get("ports") or [] if p.get("nodePort")}
        held_values = set(held.values())
        mine: dict[int, int] = {}  # the same nodePort may serve two protocols of one Service
        for index, port in enumerate(ports):
            path = f"spec.ports[{index}].nodePort"
            wanted = port.get("nodePort") or 0
            if not wanted and _port_key(port) in held:
                wanted = held[_port_key(port)]
            if wanted and (wanted in held_values or wanted in mine):
                port["nodePort"] = wanted
                mine[wanted] = index
                continue
            if wanted:
                value = self.node_ports.allocate_specific(wanted, path)
            else:
                value = self.node_ports.allocate(path)
            undo.append(lambda v=value: self.node_ports.release(v))
            port["nodePort"] = value
            mine[value] = index
        spec["ports"] = ports

    def commit_release(self, old: dict | None, new: dict | None) -> None:
        """Free what `old` held and `new` (None: deleted) no longer holds."""
        old_ips, old_ports = held_by(old)
        new_ips, new_ports = held_by(new)
        for ip in old_ips - new_ips:
            self.cluster_ips.release(ip)
        for port in old_ports - new_ports:
            self.node_ports.release(port)

    def release(self, service: dict) -> None:
        self.commit_release(service, None)

    def rebuild(self, services: list[dict]) -> list[str]:
        """Mark what stored Services hold; returns a message per clash (kept, but reported)."""
        problems = []
        for svc in services:
            ips, ports = held_by(svc)
            where = f"{svc.get('metadata', {}).get('namespace')}/{svc.get('metadata', {}).get('name')}"
            for ip in ips:
                try:
                    self.cluster_ips.allocate_specific(ip)
                except AllocationError as err:
                    problems.append(f"service {where}: {err}")
            for port in ports:
                try:
                    self.node_ports.allocate_specific(port, "spec.ports[].nodePort")
                except AllocationError as err:
                    problems.append(f"service {where}: {err}")
        return problems


def held_by(service: dict | None) -> tuple[set[str], set[int]]:
    """The cluster IPs and node ports a stored Service holds."""
    if not service:
        return set(), set()
    spec = service.get("spec") or {}
    ips = {spec["clusterIP"]} if spec.get("clusterIP") not in (None, "", "None") else set()
    ports = set()
    if wants_node_ports(service):
        ports = {p["nodePort"] for p in spec.get("ports") or [] if p.get("nodePort")}
    return ips, ports
