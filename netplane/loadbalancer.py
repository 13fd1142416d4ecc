"""LoadBalancer Services: an address pool, the allocator that fills status.loadBalancer.ingress,
and (in netplane.announcer) the speaker that answers ARP for each address from one node.

    netplane lb controller --server URL [--pool 192.168.56.200-192.168.56.250]...
    netplane lb speaker --server URL --node-name NAME --node-ip IP [--interface IF] [...]

Like MetalLB: the controller runs once per cluster (the lab's control plane), the speaker on
every node. Pure core here: the pool (ranges and CIDRs) and `allocate`, which maps the current
Services to the status changes that give each LoadBalancer Service exactly one address of the
pool, keeping the address it already has.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import time
from dataclasses import dataclass

log = logging.getLogger("lb-controller")

DEFAULT_POOL = "192.168.56.200-192.168.56.250"
LB_CLASS = "netplane.io/lb"  # spec.loadBalancerClass we answer to (besides none at all)


# ================================================================ pure core: the pool

class PoolError(ValueError):
    pass


@dataclass(frozen=True)
class AddressRange:
    first: ipaddress.IPv4Address
    last: ipaddress.IPv4Address

    def __contains__(self, ip: ipaddress.IPv4Address) -> bool:
        return self.first <= ip <= self.last

    def addresses(self):
        for value in range(int(self.first), int(self.last) + 1):
            yield ipaddress.IPv4Address(value)


def parse_range(text: str) -> AddressRange:
    """'A-B', a CIDR (its usable hosts) or one address."""
    text = text.strip()
    try:
        if "-" in text:
            first, last = (ipaddress.IPv4Address(part.strip()) for part in text.split("-", 1))
        elif "/" in text:
            net = ipaddress.IPv4Network(text, strict=True)
            hosts = list(net.hosts()) if net.prefixlen < 31 else list(net)
            first, last = hosts[0], hosts[-1]
        else:
            first = last = ipaddress.IPv4Address(text)
    except ValueError as err:
        raise PoolError(f"--pool {text!r}: {err} (want A-B, a CIDR or one IPv4 address)") from None
    if last < first:
        raise PoolError(f"--pool {text!r}: the range ends before it starts")
    return AddressRange(first, last)


@dataclass(frozen=True)
class Pool:
    ranges: tuple[AddressRange, ...]

    @classmethod
    def parse(cls, texts: list[str] | str) -> "Pool":
        """One or more ranges; each text may hold several, comma-separated."""
        if isinstance(texts, str):
            texts = [texts]
        parts = [p for text in texts for p in text.split(",") if p.strip()]
        if not parts:
            raise PoolError("--pool: no address range given")
        return cls(tuple(parse_range(p) for p in parts))

    def __contains__(self, ip: str) -> bool:
        try:
            address = ipaddress.IPv4Address(ip)
        except ValueError:
            return False
        return any(address in r for r in self.ranges)

    def first_free(self, used: set[str]) -> str | None:
        for r in self.ranges:
            for address in r.addresses():
                if str(address) not in used:
                    return str(address)
        return None

    def describe(self) -> str:
        return ",".join(f"{r.first}-{r.last}" for r in self.ranges)


# ================================================================ pure core: allocation

def key(svc: dict) -> tuple[str, str]:
    meta = svc.get("metadata") or {}
    return meta.get("namespace") or "default", meta.get("name", "")


def wants_address(svc: dict) -> bool:
    """A LoadBalancer Service we serve: no other class asked for, not being deleted."""
    spec = svc.get("spec") or {}
    return (spec.get("type") == "LoadBalancer" and spec.get("loadBalancerClass") in (None, LB_CLASS)
            and not (svc.get("metadata") or {}).get("deletionTimestamp"))


def ingress_ips(svc: dict) -> list[str]:
    ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    return [entry["ip"] for entry in ingress if isinstance(entry, dict) and entry.get("ip")]


def requested_ip(svc: dict) -> str:
    """spec.loadBalancerIP (deprecated in Kubernetes, still what users write) or MetalLB's annotation."""
    annotations = (svc.get("metadata") or {}).get("annotations") or {}
    return ((svc.get("spec") or {}).get("loadBalancerIP")
            or annotations.get("metallb.universe.tf/loadBalancerIPs", "").split(",")[0].strip())


@dataclass(frozen=True)
class StatusChange:
    namespace: str
    name: str
    ip: str | None  # None: take our address away (no longer a LoadBalancer of ours)
    reason: str

    def patch(self) -> dict:
        ingress = [{"ip": self.ip, "ipMode": "VIP"}] if self.ip else None
        return {"status": {"loadBalancer": {"ingress": ingress}}}


def _order(svc: dict) -> tuple:
    meta = svc.get("metadata") or {}
    return (meta.get("creationTimestamp") or "", *key(svc))


def allocate(services: list[dict], pool: Pool, given: dict[tuple[str, str], str] | None = None) -> list[StatusChange]:
    """The status changes that give each LoadBalancer Service one pool address.

    A Service keeps the address it has while that is still valid (in the pool, the one it asked
    for, not held by an older Service); the others get the address they ask for when free, else
    the lowest free one. A Service that stopped being a LoadBalancer gives its address back.
    `given`: {(namespace, name): address} patched by this controller that `services` (a watch view)
    does not show yet; such a Service counts as having it, so a pass on a stale view neither moves
    its address nor hands it to another Service.
    """
    given = given or {}
    ours = sorted((s for s in services if wants_address(s)), key=_order)
    used: set[str] = set()
    keeps: dict[tuple[str, str], str] = {}
    for svc in ours:  # first pass: who may keep what it has (oldest first wins a clash)
        current = [given[key(svc)]] if key(svc) in given else ingress_ips(svc)
        wanted = requested_ip(svc)
        if (len(current) == 1 and current[0] in pool and current[0] not in used
                and wanted in ("", current[0])):
            keeps[key(svc)] = current[0]
            used.add(current[0])
    changes = []
    for svc in ours:
        if key(svc) in keeps:
            continue
        wanted = requested_ip(svc)
        if wanted:
            ip = wanted if wanted in pool and wanted not in used else None
            reason = "requested" if ip else f"requested address {wanted} is not free in pool {pool.describe()}"
        else:
            ip = pool.first_free(used)
            reason = "allocated" if ip else f"pool {pool.describe()} is exhausted"
        if ip is None:
            log.warning("no address for service %s/%s: %s", *key(svc), reason)
            if ingress_ips(svc):
                changes.append(StatusChange(*key(svc), None, reason))
            continue
        used.add(ip)
        changes.append(StatusChange(*key(svc), ip, reason))
    for svc in services:  # type changed away from LoadBalancer: our address goes back to the pool
        if not wants_address(svc) and any(ip in pool for ip in ingress_ips(svc)):
            changes.append(StatusChange(*key(svc), None, "no longer a LoadBalancer"))
    return changes


# ================================================================ shell: the controller daemon

class Allocator:
    def __init__(self, client, view, pool: Pool):
        from netplane.client import UnseenWrites
        self.client, self.view, self.pool = client, view, pool
        self.given = UnseenWrites()   # (namespace, name) -> the address patched into its status

    def unseen(self, services: list[dict], now: float) -> dict[tuple[str, str], str]:
        """Addresses this process patched that the view does not show yet."""
        return self.given.unseen({key(s): ingress_ips(s) for s in services}, now)

    async def sync(self) -> None:
        from netplane.client import APIError
        if not self.view.is_synced():
            return
        services = self.view.list("Service")
        now = time.monotonic()
        for change in allocate(services, self.pool, self.unseen(services, now)):
            if change.ip:
                self.given.note((change.namespace, change.name), change.ip, now)
            else:
                self.given.forget((change.namespace, change.name))
            try:
                await self.client.patch("Service", change.name, change.patch(), change.namespace,
                                        subresource="status")
                log.info("service %s/%s: %s %s", change.namespace, change.name, change.reason,
                         change.ip or "(address released)")
            except APIError as err:
                if err.status != 404:
                    log.warning("service %s/%s: status patch failed: %s", change.namespace, change.name, err)


def controller_main(argv: list[str]) -> int:
    import asyncio

    from netplane import daemon
    from netplane.client import resolve_server, watch_and_sync

    parser = argparse.ArgumentParser(prog="netplane lb controller",
                                     description="give LoadBalancer Services an address from the pool")
    parser.add_argument("--server")
    parser.add_argument("--pool", action="append", default=[], metavar="RANGE",
                        help=f"A-B, CIDR or IP; repeat or comma-separate (default {DEFAULT_POOL})")
    parser.add_argument("--health-listen")
    args = parser.parse_args(argv)
    try:
        pool = Pool.parse(args.pool or [DEFAULT_POOL])
    except PoolError as err:
        parser.error(str(err))
    daemon.setup_logging("lb-controller")
    log.info("address pool %s", pool.describe())

    async def run(stop: asyncio.Event) -> None:
        await watch_and_sync(resolve_server(args.server), ["Service"],
                             lambda client, view: Allocator(client, view, pool).sync,
                             stop, min_interval=0.05, periodic=30.0)

    return daemon.run(run, "lb-controller", args.health_listen)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "controller":
        return controller_main(argv[1:])
    if argv and argv[0] == "speaker":
        from netplane.announcer import main as speaker_main
        return speaker_main(argv[1:])
    print("usage: netplane lb controller|speaker [--help]\n"
          "  controller  give LoadBalancer Services an address from the pool (once per cluster)\n"
          "  speaker     answer ARP for those addresses from one healthy node (on every node)")
    return 0 if argv and argv[0] in ("-h", "--help") else 2
