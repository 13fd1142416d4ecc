"""Links, addresses and routes: what ADD asks of the kernel, as `ip -batch` text, and running it.

The plan is pure: from the config, the bridge as it is now and the chosen addresses, it computes the
lines of one `ip -batch -` for the caller's namespace (bridge, gateway address, veth pair) and one for
the pod's namespace (address, up, routes), each host line with the line that undoes it. The shell
runs a batch, learns from "Command failed -:N" which lines took effect, and pushes exactly their undos.
iproute2 does the netlink work, so the plugin never imports pyroute2 (0.3-0.5 s per exec).
"""
from __future__ import annotations

import ipaddress
import os
from collections import namedtuple

from . import jsonlite as json
from .proc import ProcError, run
from .spec import INTERNAL, CniError

_FAILED_LINE = "Command failed -:"   # how `ip -batch` names the line that failed

# One line of an `ip -batch`, and the line that undoes it (None: undone by deleting the veth).
Step = namedtuple("Step", "command undo", defaults=(None,))
# A link as `ip -j -d addr show` reports it; addresses are ipaddress.ip_interface values.
LinkState = namedtuple("LinkState", "name kind mac up promisc mtu master addresses")


_NAMED_NETNS_DIRS = ("/run/netns", "/var/run/netns")


def ip_argv(netns: str | None, *args: str) -> list:
    """`ip ARGS` in the caller's namespace, or in the namespace at path `netns`: `ip -n NAME` for a
    named one (/run/netns/NAME, one exec), else through nsenter (/proc/PID/ns/net; ~1 ms more)."""
    if not netns:
        return ["ip", *args]
    directory, _, name = netns.rpartition("/")
    if directory in _NAMED_NETNS_DIRS and name:
        return ["ip", "-n", name, *args]
    return ["nsenter", f"--net={netns}", "ip", *args]


def parse_link(entry: dict) -> LinkState:
    flags = entry.get("flags", [])
    addresses = tuple(ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")
                      for a in entry.get("addr_info", []) if "local" in a)
    return LinkState(name=entry["ifname"], kind=entry.get("linkinfo", {}).get("info_kind", ""),
                     mac=entry.get("address", ""), up="UP" in flags, promisc="PROMISC" in flags,
                     mtu=entry.get("mtu", 0), master=entry.get("master", ""), addresses=addresses)


def show_link(name: str, netns: str | None = None) -> LinkState | None:
    """The link with its addresses, or None when there is no such link."""
    code, out, err = run(ip_argv(netns, "-j", "-d", "addr", "show", "dev", name), check=False)
    if code != 0:
        if "does not exist" in err:
            return None
        raise CniError(INTERNAL, f"cannot read link {name}: {err.strip()}")
    entries = json.loads(out or "[]")
    return parse_link(entries[0]) if entries else None


def links_with_master(bridge: str) -> list:
    code, out, err = run(ip_argv(None, "-j", "link", "show", "master", bridge), check=False)
    if code != 0:
        return []
    return [e["ifname"] for e in json.loads(out or "[]")]


# ---- the plan (pure) ------------------------------------------------------------------------------

def plan_bridge(conf, bridge: LinkState | None, gateways: list, bridge_mac: str) -> list:
    """Steps that make the bridge exist, carry each gateway address (when isGateway) and be up.

    `gateways` are ip_interface values (gateway/prefix). An existing bridge keeps its other addresses,
    except an IPv4 one (or an overlapping IPv6 one), which is an error unless forceAddress."""
    name = conf.bridge
    steps = []
    if bridge is None:
        mtu = f" mtu {conf.mtu}" if conf.mtu else ""
        steps.append(Step(f"link add {name}{mtu} address {bridge_mac} type bridge", f"link del {name}"))
    elif bridge.kind != "bridge":
        raise CniError(INTERNAL, f"{name} exists but is a {bridge.kind or 'plain'} link, not a bridge")
    present = bridge.addresses if bridge else ()
    for gw in gateways if conf.is_gateway else ():
        if gw in present:
            continue
        for old in present:
            if _conflicts(old, gw):
                if not conf.force_address:
                    raise CniError(INTERNAL, f"bridge {name} already has address {old}, not {gw} "
                                             f"(set forceAddress to replace it)")
                steps.append(Step(f"addr del {old} dev {name}", f"addr add {old} dev {name}"))
        nodad = " nodad" if gw.version == 6 else ""
        steps.append(Step(f"addr add {gw} dev {name}{nodad}", f"addr del {gw} dev {name}"))
    if conf.promisc and (bridge is None or not bridge.promisc):
        steps.append(Step(f"link set {name} promisc on", f"link set {name} promisc off" if bridge else None))
    if bridge is None or not bridge.up:
        steps.append(Step(f"link set {name} up", f"link set {name} down" if bridge else None))
    return steps


def _conflicts(old, new) -> bool:
    if old.version != new.version or old.ip.is_link_local:
        return False
    return old.version == 4 or old.network.overlaps(new.network)


def plan_veth(conf, host: str, host_mac: str, ifname: str, pod_mac: str, netns: str) -> list:
    mtu = f" mtu {conf.mtu}" if conf.mtu else ""
    steps = [Step(f"link add {host} address {host_mac}{mtu} master {conf.bridge} up type veth "
                  f"peer name {ifname} address {pod_mac}{mtu} netns {netns}", f"link del {host}")]
    if conf.hairpin:
        steps.append(Step(f"link set {host} type bridge_slave hairpin on"))
    return steps


def plan_pod(ifname: str, addresses: list, routes: list) -> list:
    """Lines for the pod's namespace: up, addresses (IPv6 without DAD, so it is usable at once), routes.
    `routes` are spec.Route values whose gw is already resolved (or None for on-link)."""
    steps = [Step(f"link set {ifname} up")]
    for address in addresses:
        nodad = " nodad" if address.version == 6 else ""
        steps.append(Step(f"addr add {address} dev {ifname}{nodad}"))
    for route in routes:
        via = f" via {route.gw}" if route.gw else ""
        steps.append(Step(f"route add {route.dst}{via} dev {ifname}"))
    return steps


# ---- the shell ------------------------------------------------------------------------------------

def run_batch(steps: list, undo, netns: str | None = None) -> None:
    """Run the steps as one `ip -batch -`; push the undo of every step that took effect (via
    undo(netns, line)), then raise naming the line that failed, if one did."""
    if not steps:
        return
    code, _, err = run(ip_argv(netns, "-batch", "-"), "\n".join(s.command for s in steps) + "\n",
                       check=False)
    done = len(steps) if code == 0 else failed_line(err) - 1
    for step in steps[:done]:
        if step.undo:
            undo(netns, step.undo)
    if code != 0:
        failed = steps[done].command if 0 <= done < len(steps) else "?"
        message = " ".join(line for line in err.splitlines() if not line.startswith(_FAILED_LINE))
        raise CniError(INTERNAL, f"ip {failed!r} failed{' in ' + netns if netns else ''}: {message}")


def failed_line(stderr: str) -> int:
    """The 1-based line `ip -batch` stopped at ("Command failed -:N"); 1 when it does not say."""
    for line in stderr.splitlines():
        if line.startswith(_FAILED_LINE) and line[len(_FAILED_LINE):].strip().isdigit():
            return int(line[len(_FAILED_LINE):])
    return 1


def run_line(netns: str | None, line: str) -> None:
    """Run one undo/delete line; "already gone" is success."""
    try:
        run(ip_argv(netns, *line.split()))
    except ProcError as e:
        if not _is_gone(e.stderr):
            raise


def delete_link(name: str, netns: str | None = None) -> bool:
    """Delete a link; False when it was already gone."""
    try:
        run(ip_argv(netns, "link", "del", name))
        return True
    except ProcError as e:
        if _is_gone(e.stderr):
            return False
        raise CniError(INTERNAL, str(e))


def _is_gone(stderr: str) -> bool:
    return any(s in stderr for s in ("Cannot find device", "does not exist", "Cannot assign requested",
                                     "No such file or directory", "No such process"))


def read_sysctl(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def write_sysctl(path: str, value: str) -> None:
    """/proc/sys/net follows the writer's network namespace: this sets it for the caller's (the node)."""
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise CniError(INTERNAL, f"cannot set {path} to {value}: {e}")


def random_mac() -> str:
    """A random locally administered unicast MAC (setting MACs ourselves means no read-back exec)."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in octets)
