"""The cluster zone: a pure function of the objects, and the lookup that answers one question from it.

build_zone() turns Services/EndpointSlices (as netplane.dns.model values) into every name the zone
holds, with its record sets (the Kubernetes DNS spec 1.1.0 record set, shaped like CoreDNS's answers);
lookup() answers (name, type) with CoreDNS's rcode rules: NXDOMAIN for a name that does not exist,
NODATA (NOERROR, empty answer) for a name that exists without that type, both with the SOA in the
authority section; SERVFAIL for cluster names before the first sync. No I/O and no clock here.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from netplane.dns.model import Objects, Service

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
SCHEMA_VERSION = "1.1.0"
DNS_VERSION_TTL = 28800  # CoreDNS serves dns-version with this fixed TTL
REVERSE_ZONES = ("in-addr.arpa", "ip6.arpa")
MAX_CNAME_CHAIN = 8


@dataclass(frozen=True)
class Record:
    name: str  # owner, lower case, no trailing dot
    rtype: str  # "A", "AAAA", "SRV", ...
    ttl: int
    data: str  # RDATA in zone-file text: "10.96.0.1", "0 100 80 web.default.svc.cluster.local."

    def text(self) -> str:
        return f"{self.name}. {self.ttl} IN {self.rtype} {self.data}"


@dataclass(frozen=True)
class Answer:
    rcode: int
    answer: tuple[Record, ...] = ()
    authority: tuple[Record, ...] = ()
    additional: tuple[Record, ...] = ()
    chase: str = ""  # an ExternalName target outside the zone: the server resolves it and appends


Node = dict[str, tuple[Record, ...]]  # rtype -> record set; {} for an empty non-terminal


@dataclass
class Zone:
    origin: str
    ttl: int
    serial: int
    nodes: dict[str, Node] = field(default_factory=dict)  # every name that exists, cluster and reverse
    synced: bool = True
    pods: str = "disabled"  # CoreDNS `pods` mode: "disabled", or "insecure" (any a-b-c-d.<ns>.pod name)

    def soa_for(self, name: str) -> Record:
        """The SOA for negative answers about `name`: the cluster zone's, or the reverse zone's."""
        apex = next((z for z in REVERSE_ZONES if in_domain(name, z)), self.origin)
        soa_ttl = min(self.ttl, 300)
        return Record(apex, "SOA", soa_ttl, f"ns.dns.{self.origin}. hostmaster.{self.origin}. "
                                            f"{self.serial} 7200 1800 86400 {self.ttl}")

    def serves(self, name: str) -> bool:
        """Names this server is authoritative for (everything else is forwarded)."""
        return in_domain(name, self.origin) or name in self.nodes


def in_domain(name: str, domain: str) -> bool:
    return name == domain or name.endswith("." + domain)


def reverse_name(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer


def address_type(ip: str) -> str:
    return "AAAA" if ":" in ip else "A"


def unsynced_zone(origin: str, ttl: int = 5) -> Zone:
    """The zone before the first sync: SERVFAIL for every cluster name (never a false NXDOMAIN)."""
    return Zone(origin.lower().strip("."), ttl, 0, synced=False)


# ---------------------------------------------------------------------------------------------
# Building


class _ZoneBuilder:
    def __init__(self, origin: str, ttl: int, serial: int):
        self.zone = Zone(origin, ttl, serial)

    def add(self, name: str, rtype: str, data: str, ttl: int | None = None) -> None:
        node = self._node(name)
        record = Record(name, rtype, self.zone.ttl if ttl is None else ttl, data)
        existing = node.get(rtype, ())
        if record not in existing:
            node[rtype] = existing + (record,)

    def _node(self, name: str) -> Node:
        node = self.zone.nodes.get(name)
        if node is None:
            node = self.zone.nodes[name] = {}
            # Every ancestor up to the apex exists too (an empty non-terminal answers NODATA).
            if name != self.zone.origin and in_domain(name, self.zone.origin):
                self._node(name.split(".", 1)[1])
        return node

    def apex(self, name_server_ips: tuple[str, ...]) -> None:
        origin = self.zone.origin
        self.zone.nodes[origin] = {"SOA": (self.zone.soa_for(origin),)}
        self.add(origin, "NS", f"ns.dns.{origin}.")
        self._node(f"ns.dns.{origin}")
        for ip in name_server_ips:
            self.add(f"ns.dns.{origin}", address_type(ip), ip)
        self.add(f"dns-version.{origin}", "TXT", f'"{SCHEMA_VERSION}"', DNS_VERSION_TTL)
        self._node(f"svc.{origin}")
        self._node(f"pod.{origin}")

    def namespace(self, namespace: str) -> None:
        self._node(f"{namespace}.svc.{self.zone.origin}")

    def service(self, svc: Service) -> None:
        name = f"{svc.name}.{svc.namespace}.svc.{self.zone.origin}"
        if svc.external_name:
            self.add(name, "CNAME", svc.external_name + ".")
            return
        if not svc.headless and not svc.ports:
            return  # CoreDNS: a ClusterIP Service without ports has no records (NXDOMAIN)
        ready = [ep for ep in svc.endpoints if ep.ready or svc.publish_not_ready]
        for ep in ready:  # endpoint names and PTRs for every Service, as CoreDNS serves them
            host = f"{ep.hostname}.{name}"
            self.add(host, address_type(ep.ip), ep.ip)
            self.add(reverse_name(ep.ip), "PTR", host + ".")
        if svc.headless:
            for ep in ready:
                self.add(name, address_type(ep.ip), ep.ip)
            hosts = list(dict.fromkeys(f"{ep.hostname}.{name}" for ep in ready))
            self._srv(name, [(host, port) for host in hosts for port in svc.endpoint_ports])
        else:
            for ip in svc.cluster_ips:
                self.add(name, address_type(ip), ip)
                self.add(reverse_name(ip), "PTR", name + ".")
            self._srv(name, [(name, port) for port in svc.ports])

    def _srv(self, name: str, targets: list) -> None:
        """SRV at `_port._proto.<service>` per named port, and at the bare service name for all
        ports (a CoreDNS extension); weight 100/N over the N targets, priority 0, as CoreDNS."""
        named: dict[str, list] = {}
        for host, port in targets:
            if port.name:
                named.setdefault(f"_{port.name.lower()}._{port.protocol}.{name}", []).append((host, port))
        for owner, group in [(name, targets), *named.items()]:
            weight = max(1, 100 // len(group)) if group else 0
            for host, port in group:
                self.add(owner, "SRV", f"0 {weight} {port.port} {host}.")


def build_zone(objects: Objects, origin: str = "cluster.local", ttl: int = 5, serial: int = 0,
               pods: str = "disabled") -> Zone:
    """Every name of the cluster zone (and the reverse names of Service and endpoint IPs)."""
    builder = _ZoneBuilder(origin.lower().strip("."), ttl, serial)
    builder.zone.pods = pods
    name_servers = next((s.cluster_ips for s in objects.services
                         if (s.namespace, s.name) == ("kube-system", "kube-dns")), ())
    builder.apex(name_servers)
    for namespace in sorted(objects.namespaces):
        builder.namespace(namespace.lower())
    for svc in objects.services:
        builder.service(svc)
    return builder.zone


# ---------------------------------------------------------------------------------------------
# Answering


def lookup(zone: Zone, qname: str, qtype: str, depth: int = 0) -> Answer | None:
    """The answer to one question, or None when the name is not ours (forward it).

    `qname` in any case, with or without the trailing dot; `qtype` a type name ("A", "SRV", "ANY").
    """
    name = qname.lower().rstrip(".")
    node = zone.nodes.get(name)
    if node is None and zone.pods == "insecure" and zone.synced:
        node = _pod_node(zone, name)
    if node is None:
        if not in_domain(name, zone.origin):
            return None
        rcode = NXDOMAIN if zone.synced else SERVFAIL
        return Answer(rcode, authority=(zone.soa_for(name),))
    cname = node.get("CNAME")
    if cname and qtype != "CNAME":
        return _follow_cname(zone, cname, qtype, depth)
    records = [r for rrset in node.values() for r in rrset] if qtype == "ANY" else node.get(qtype, ())
    if not records:
        return Answer(NOERROR, authority=(zone.soa_for(name),))
    return Answer(NOERROR, tuple(records), additional=_additional(zone, records))


def _pod_node(zone: Zone, name: str) -> Node | None:
    """CoreDNS `pods insecure`: `<ns>.pod.<zone>` exists (empty) and `1-2-3-4.<ns>.pod.<zone>` has
    the A (or AAAA, `1234-abcd--1`) its name spells, whether or not such a pod exists."""
    suffix = f".pod.{zone.origin}"
    if not name.endswith(suffix):
        return None
    labels = name[:-len(suffix)].split(".")
    if len(labels) == 1:
        return {}
    if len(labels) != 2:
        return None
    ip = _undash(labels[0])
    if ip is None:
        return None
    return {address_type(ip): (Record(name, address_type(ip), zone.ttl, ip),)}


def _undash(label: str) -> str | None:
    for text in (label.replace("-", "."), label.replace("-", ":")):
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            continue
    return None


def _follow_cname(zone: Zone, cname: tuple[Record, ...], qtype: str, depth: int) -> Answer:
    target = cname[0].data.rstrip(".")
    if not zone.serves(target):
        return Answer(NOERROR, cname, chase=target)
    if depth >= MAX_CNAME_CHAIN:
        return Answer(SERVFAIL, cname)
    inner = lookup(zone, target, qtype, depth + 1)
    return Answer(inner.rcode, cname + inner.answer, inner.authority, inner.additional, inner.chase)


def _additional(zone: Zone, records) -> tuple[Record, ...]:
    """Addresses of SRV targets and of name servers, so clients need no second query."""
    extra: list[Record] = []
    for record in records:
        if record.rtype == "SRV":
            target = record.data.split()[3].rstrip(".")
        elif record.rtype == "NS":
            target = record.data.rstrip(".")
        else:
            continue
        node = zone.nodes.get(target, {})
        for rtype in ("A", "AAAA"):
            extra.extend(r for r in node.get(rtype, ()) if r not in extra)
    return tuple(extra)
