"""The vxlan pod network (`netplane agent --pod-network vxlan`), like flannel's vxlan backend.

Each node has one vxlan device, np-vxlan (VNI 1, UDP 8472, no learning), with its pod CIDR's
network address as a /32 and a MAC derived from its node address, published on its Node as the
annotation netplane.io/vtep-mac. For every other node with a pod CIDR, an address and that
annotation, the agent keeps three entries, all computed here from the Node objects:

    route     10.244.2.0/24 via 10.244.2.0 dev np-vxlan onlink proto 78
    neighbour 10.244.2.0 lladdr <its vtep MAC> dev np-vxlan nud permanent
    fdb       <its vtep MAC> dev np-vxlan dst <its node address>

so a packet for a pod over there is sent to that node's VTEP, wrapped in UDP to its node address.
Pure core: the device facts, the desired state, the commands from actual to desired. The shell
(ensure_device, read_actual, sync) runs `ip`/`bridge` in the current network namespace.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass, field

from netplane import netns

DEVICE = "np-vxlan"
VNI = 1
PORT = 8472
MTU = 1450  # 1500 less the 50 bytes of outer Ethernet/IP/UDP/VXLAN headers
MAC_ANNOTATION = "netplane.io/vtep-mac"
NETWORK_ANNOTATION = "netplane.io/pod-network"
ROUTE_PROTO = "78"


def vtep_mac(node_ip: str) -> str:
    """A stable, locally administered unicast MAC for a node's VTEP (the same after a restart)."""
    digest = hashlib.sha256(node_ip.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x0e, *digest[:5]))


def vtep_address(pod_cidr: str) -> str:
    """The VTEP's own address: the pod CIDR's network address (cni0 has the first host)."""
    return str(ipaddress.ip_network(pod_cidr).network_address)


def node_annotations(node_ip: str) -> dict[str, str]:
    return {MAC_ANNOTATION: vtep_mac(node_ip), NETWORK_ANNOTATION: "vxlan"}


@dataclass
class OverlayState:
    routes: dict[str, str] = field(default_factory=dict)     # remote pod CIDR -> its VTEP address
    neighbours: dict[str, str] = field(default_factory=dict)  # remote VTEP address -> its MAC
    fdb: dict[str, str] = field(default_factory=dict)         # remote VTEP MAC -> its node address


def _internal_ip(node: dict) -> str:
    for address in (node.get("status") or {}).get("addresses") or []:
        if address.get("type") == "InternalIP":
            return address.get("address", "")
    return ""


def desired_state(nodes: list[dict], me: str) -> OverlayState:
    """The entries for every other node that has a pod CIDR, an address and a VTEP MAC."""
    state = OverlayState()
    for node in nodes:
        meta = node.get("metadata") or {}
        if meta.get("name") == me:
            continue
        cidr = (node.get("spec") or {}).get("podCIDR")
        mac = (meta.get("annotations") or {}).get(MAC_ANNOTATION, "").lower()
        try:
            network = ipaddress.IPv4Network(cidr) if cidr else None
            address = str(ipaddress.IPv4Address(_internal_ip(node)))
        except ValueError:
            continue  # one malformed Node must not break the others' entries
        if network is None or not _is_mac(mac):
            continue
        gateway = str(network.network_address)
        state.routes[str(network)] = gateway
        state.neighbours[gateway] = mac
        state.fdb[mac] = address
    return state


def _is_mac(text: str) -> bool:
    parts = text.split(":")
    return len(parts) == 6 and all(len(p) == 2 and all(c in "0123456789abcdef" for c in p) for p in parts)


def commands(desired: OverlayState, actual: OverlayState) -> list[list[str]]:
    """`ip`/`bridge` commands turning `actual` into `desired`: fdb and neighbours before the routes
    that use them; routes removed before the entries they used."""
    out: list[list[str]] = []
    for mac, dst in sorted(desired.fdb.items()):
        if actual.fdb.get(mac) != dst:
            out.append(["bridge", "fdb", "replace", mac, "dev", DEVICE, "dst", dst, "self", "permanent"])
    for ip, mac in sorted(desired.neighbours.items()):
        if actual.neighbours.get(ip) != mac:
            out.append(["ip", "neigh", "replace", ip, "lladdr", mac, "dev", DEVICE, "nud", "permanent"])
    for cidr, via in sorted(desired.routes.items()):
        if actual.routes.get(cidr) != via:
            out.append(["ip", "route", "replace", cidr, "via", via, "dev", DEVICE, "onlink",
                        "proto", ROUTE_PROTO])
    out += [["ip", "route", "del", cidr, "proto", ROUTE_PROTO]
            for cidr in sorted(set(actual.routes) - set(desired.routes))]
    out += [["ip", "neigh", "del", ip, "dev", DEVICE]
            for ip in sorted(set(actual.neighbours) - set(desired.neighbours))]
    out += [["bridge", "fdb", "del", mac, "dev", DEVICE, "self"] for mac in sorted(set(actual.fdb) - set(desired.fdb))]
    return out


def parse_actual(routes_json: str, neigh_json: str, fdb_json: str) -> OverlayState:
    """What the kernel has: our marked routes, the device's permanent neighbours and fdb entries."""
    state = OverlayState()
    for entry in json.loads(routes_json or "[]"):
        if entry.get("dst") and entry.get("gateway"):
            dst = entry["dst"] if "/" in entry["dst"] else entry["dst"] + "/32"
            state.routes[dst] = entry["gateway"]
    for entry in json.loads(neigh_json or "[]"):
        if entry.get("dst") and entry.get("lladdr"):
            state.neighbours[entry["dst"]] = entry["lladdr"].lower()
    for entry in json.loads(fdb_json or "[]"):
        if entry.get("mac") and entry.get("dst"):
            state.fdb[entry["mac"].lower()] = entry["dst"]
    return state


def device_matches(link: dict, node_ip: str) -> bool:
    """`ip -j -d link show np-vxlan`'s entry is our device for this node (else it is made anew)."""
    info = (link.get("linkinfo") or {}).get("info_data") or {}
    return (info.get("id") == VNI and info.get("local") == node_ip and info.get("port") == PORT
            and (link.get("address") or "").lower() == vtep_mac(node_ip))


# ================================================================ shell

def ensure_device(node_ip: str, pod_cidr: str) -> bool:
    """np-vxlan exists, is ours for this node, is up and holds its VTEP address; True if (re)made."""
    shown = netns.run(["ip", "-j", "-d", "link", "show", DEVICE], check=False)
    links = json.loads(shown.stdout or "[]") if shown.returncode == 0 else []
    made = False
    if not (links and device_matches(links[0], node_ip)):
        if links:
            netns.run(["ip", "link", "delete", DEVICE])
        netns.run(["ip", "link", "add", DEVICE, "address", vtep_mac(node_ip), "mtu", str(MTU), "type", "vxlan",
                   "id", str(VNI), "local", node_ip, "dstport", str(PORT), "nolearning"])
        made = True
    netns.run(["ip", "addr", "replace", f"{vtep_address(pod_cidr)}/32", "dev", DEVICE])
    netns.run(["ip", "link", "set", DEVICE, "up"])
    return made


def read_actual() -> OverlayState:
    routes = netns.run(["ip", "-j", "route", "show", "proto", ROUTE_PROTO]).stdout
    neigh = netns.run(["ip", "-j", "neigh", "show", "dev", DEVICE, "nud", "permanent"], check=False).stdout
    fdb = netns.run(["bridge", "-j", "fdb", "show", "dev", DEVICE], check=False).stdout
    return parse_actual(routes, neigh, fdb)
