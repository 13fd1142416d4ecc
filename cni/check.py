"""CHECK: compare what ADD reported (prevResult) with what the kernel and the IPAM store hold now.

`compare_pod` is pure (prevResult + the pod's link and routes as iproute2 shows them -> problems);
`problems` gathers the live state and adds the host side, the IPAM records and the masquerade table.
"""
from __future__ import annotations

from . import jsonlite as json
from . import ipam, ipnet, link, masq
from .proc import run


def _route_key(dst: str, gw) -> tuple:
    if dst == "default" or not dst:
        dst = "::/0" if gw and ":" in str(gw) else "0.0.0.0/0"
    return str(ipnet.ip_network(dst, strict=False)), str(gw or "")


def _pod_index(prev: dict, ifname: str) -> int | None:
    for i, iface in enumerate(prev.get("interfaces") or []):
        if isinstance(iface, dict) and iface.get("name") == ifname and iface.get("sandbox"):
            return i
    return None


def compare_pod(prev: dict, ifname: str, pod_link, routes: list) -> list:
    """Problems with the pod's interface, addresses and routes; `routes` are `ip -j route` entries."""
    index = _pod_index(prev, ifname)
    if index is None:
        return [f"prevResult has no interface {ifname} in a sandbox"]
    if pod_link is None:
        return [f"interface {ifname} is missing in the pod namespace"]
    problems = []
    want_mac = prev["interfaces"][index].get("mac")
    if want_mac and want_mac.lower() != pod_link.mac.lower():
        problems.append(f"{ifname} has MAC {pod_link.mac}, prevResult says {want_mac}")
    if not pod_link.up:
        problems.append(f"{ifname} is down")
    for ip in prev.get("ips") or []:
        if ip.get("interface") == index and ipnet.ip_interface(ip["address"]) not in pod_link.addresses:
            problems.append(f"{ifname} lacks address {ip['address']}")
    present = {_route_key(r.get("dst", ""), r.get("gateway")) for r in routes
               if r.get("table", "main") == "main" and r.get("type", "unicast") == "unicast"}
    for r in prev.get("routes") or []:
        if _route_key(r.get("dst", ""), r.get("gw")) not in present:
            problems.append(f"route {r.get('dst')} via {r.get('gw') or '(on-link)'} is missing")
    return problems


def _pod_state(netns: str, ifname: str) -> tuple:
    """(LinkState or None, main-table routes of both families) in the pod's namespace, one exec."""
    lines = [f"addr show dev {ifname}", "route show table all root 0.0.0.0/0", "route show table all root ::/0"]
    code, out, err = run(link.ip_argv(netns, "-j", "-d", "-force", "-batch", "-"), "\n".join(lines) + "\n",
                         check=False)
    arrays = [json.loads(line) for line in out.splitlines() if line.strip().startswith("[")]
    if "does not exist" in err:
        return None, [r for a in arrays for r in a]
    pod_link = link.parse_link(arrays[0][0]) if arrays and arrays[0] else None
    return pod_link, [r for a in arrays[1:] for r in a]


def problems(conf, env, store: ipam.Store, host: str) -> list:
    prev = conf.prev_result
    pod_link, routes = _pod_state(env.netns, env.ifname)
    found = compare_pod(prev, env.ifname, pod_link, routes)
    host_link = link.show_link(host)
    if host_link is None:
        found.append(f"host veth {host} is missing")
    elif host_link.master != conf.bridge:
        found.append(f"host veth {host} is not a port of {conf.bridge}")
    found += _ipam_problems(conf, env, store, prev)
    if conf.ip_masq and run(["nft", "list", "table", "inet", masq.table_name(conf.name)], check=False)[0] != 0:
        found.append(f"masquerade table inet {masq.table_name(conf.name)} is missing")
    return found


def _ipam_problems(conf, env, store: ipam.Store, prev: dict) -> list:
    if not conf.ipam.builtin:
        from . import delegate
        delegate.call("CHECK", conf.ipam.type, env, conf.raw)
        return []
    allocations = store.allocations()
    out = []
    for ip in prev.get("ips") or []:
        address = ipnet.ip_interface(ip["address"]).ip
        who = allocations.get(address)
        if who is None or not ipam.owned_by(who, env.container_id, env.ifname):
            out.append(f"{address} is not allocated to {env.container_id}/{env.ifname} in {store.dir}")
    return out
