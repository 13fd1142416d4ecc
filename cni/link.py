"""Links, addresses and routes: what ADD asks of the kernel, as `ip`-style lines, and running them.

The plan is pure: from the config, the bridge as it is now and the chosen addresses, it computes the
lines for the caller's namespace (bridge, gateway address, veth pair) and for the pod's namespace
(address, up, routes), each host line with the line that undoes it. The lines read like iproute2's
commands (so undo logs and errors say what happened in words a user can paste), but no `ip` runs: the
shell turns each line into netlink requests (netlink.py), sends a plan's requests together on a socket
in the right namespace (run_batch), and pushes the undo of every line the kernel accepted. Only CHECK
still reads through `ip`.
"""
import posix

from . import ipnet, netlink
from .record import record
from .spec import INTERNAL, CniError

# One line of the plan, and the line that undoes it (None: undone by deleting the veth).
Step = record("Step", "command undo", defaults=(None,))
# A link and its addresses (ipnet.Interface values); master is the master's name ("" when none).
LinkState = record("LinkState", "name kind mac up promisc mtu master addresses")

_NAMED_NETNS_DIRS = ("/run/netns", "/var/run/netns")
_GONE = (2, 3, 19, 99)   # ENOENT, ESRCH, ENODEV, EADDRNOTAVAIL: what "already undone" looks like


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
    """A link as `ip -j -d addr show` reports it."""
    flags = entry.get("flags", [])
    addresses = tuple(ipnet.ip_interface(f"{a['local']}/{a['prefixlen']}")
                      for a in entry.get("addr_info", []) if "local" in a)
    return LinkState(name=entry["ifname"], kind=entry.get("linkinfo", {}).get("info_kind", ""),
                     mac=entry.get("address", ""), up="UP" in flags, promisc="PROMISC" in flags,
                     mtu=entry.get("mtu", 0), master=entry.get("master", ""), addresses=addresses)


def show_link(name: str, netns: str | None = None) -> LinkState | None:
    """The link with its addresses, or None when there is no such link."""
    rtnl = _rtnl(netns)
    try:
        found = rtnl.link(name)
        if found is None:
            return None
        master = rtnl.link(index=found.master).name if found.master else ""
        addresses = tuple(rtnl.addresses(found.index))
    except netlink.NetlinkError as e:
        raise CniError(INTERNAL, f"cannot read link {name}: {e.strerror}")
    return LinkState(found.name, found.kind, found.mac, bool(found.flags & netlink.IFF_UP),
                     bool(found.flags & netlink.IFF_PROMISC), found.mtu, master, addresses)


def links_with_master(bridge: str) -> list:
    """Names of the bridge's ports ([] when there is no such bridge)."""
    rtnl = _rtnl(None)
    try:
        master = rtnl.link(bridge)
        return [found.name for found in rtnl.links() if master and found.master == master.index]
    except netlink.NetlinkError as e:
        raise CniError(INTERNAL, f"cannot list the ports of {bridge}: {e.strerror}")


# ---- the plan (pure) ------------------------------------------------------------------------------

def plan_bridge(conf, bridge: LinkState | None, gateways: list, bridge_mac: str) -> list:
    """Steps that make the bridge exist, carry each gateway address (when isGateway) and be up.

    `gateways` are ipnet.Interface values (gateway/prefix). An existing bridge keeps its other addresses,
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

_connections: dict = {}


def _rtnl(netns: str | None) -> netlink.Rtnl:
    """One netlink socket per namespace for the life of the process (the pod's is made on first use)."""
    if netns not in _connections:
        try:
            _connections[netns] = netlink.Rtnl(netns)
        except netlink.NetlinkError as e:
            raise CniError(INTERNAL, f"cannot open netlink{' in ' + netns if netns else ''}: {e.strerror}")
    return _connections[netns]


def close_connections() -> None:
    """Close every socket _rtnl opened (the node helper does, after each request)."""
    while _connections:
        _connections.popitem()[1].close()


def run_batch(steps: list, undo, netns: str | None = None) -> None:
    """Run the steps in order; push the undo of every step that took effect (via undo(netns, line)),
    then raise naming the line that failed, if one did.

    The steps' requests go to the kernel together, one write per run of steps whose links are known
    (a step naming a link by index that an earlier step makes waits for that one's answer), so a
    plan costs a round trip or two, not one per step. A refused step does not stop the later ones
    of its write: each that took effect is undone with the rest."""
    if not steps:
        return
    rtnl = _rtnl(netns)
    pending = []   # (step, its requests), sent together by flush()
    failure = None

    def flush() -> None:
        nonlocal failure
        messages = [m for _, requests in pending for m in requests]
        outcomes = iter(rtnl.requests(messages)) if messages else iter(())
        for step, requests in pending:
            answers = [next(outcomes) for _ in requests]
            refused = next((a for a in answers if isinstance(a, netlink.NetlinkError)), None)
            if refused is None:
                _learn_from_answers(step.command, answers)
                if step.undo:
                    undo(netns, step.undo)
            elif failure is None:
                failure = CniError(INTERNAL, f"ip {step.command!r} failed{' in ' + netns if netns else ''}: "
                                             f"{refused.strerror}")
        pending.clear()

    def index_of(name: str) -> int:
        if name not in rtnl.indexes:
            flush()   # the link may be one a pending step makes
        return rtnl.index(name)

    with _OpenNamespaces() as namespaces:
        for step in steps:
            try:
                requests = line_requests(step.command, index_of, namespaces)
            except netlink.NetlinkError as e:   # a link it names is not there
                flush()
                failure = failure or CniError(INTERNAL, f"ip {step.command!r} failed"
                                                        f"{' in ' + netns if netns else ''}: {e.strerror}")
            if failure:   # from that, or from an earlier step answered while this one was planned
                break
            pending.append((step, requests))
        flush()
    if failure:
        raise failure


def run_line(netns: str | None, line: str) -> None:
    """Run one undo/delete line; "already gone" is success."""
    try:
        apply_line(_rtnl(netns), line)
    except netlink.NetlinkError as e:
        if e.errno not in _GONE:
            raise CniError(INTERNAL, f"ip {line!r} failed{' in ' + netns if netns else ''}: {e.strerror}")


def delete_link(name: str, netns: str | None = None) -> bool:
    """Delete a link; False when it was already gone."""
    try:
        _rtnl(netns).delete_link(name)
        return True
    except netlink.NetlinkError as e:
        if e.errno in _GONE:
            return False
        raise CniError(INTERNAL, f"cannot delete link {name}{' in ' + netns if netns else ''}: {e.strerror}")


def delete_link_detached(name: str) -> bool:
    """DEL's deletion of a host veth: returns once the kernel has unregistered the pair, without waiting
    for its clean-up (see netlink.delete_link_detached); False when it was already gone."""
    rtnl = _rtnl(None)
    try:
        found = rtnl.link(name)
        if found is None:
            return False
        netlink.delete_link_detached(rtnl, found.index)
        rtnl.indexes.pop(name, None)
        return True
    except netlink.NetlinkError as e:
        if e.errno in _GONE:
            return False
        raise CniError(INTERNAL, f"cannot delete link {name}: {e.strerror}")


# ---- the lines, as netlink requests ---------------------------------------------------------------

_FLAG_WORDS = ("up", "down", "nodad")


def _words(words: list) -> tuple:
    """({keyword: value}, {flag words}) of `mtu 1500 address M up ...`."""
    options, flags, i = {}, set(), 0
    while i < len(words):
        if words[i] in _FLAG_WORDS:
            flags.add(words[i])
            i += 1
        else:
            options[words[i]] = words[i + 1]
            i += 2
    return options, flags


def apply_line(rtnl: netlink.Rtnl, line: str) -> None:
    """Send the netlink requests of one plan line, one after another; NetlinkError when one is refused."""
    with _OpenNamespaces() as namespaces:
        for message in line_requests(line, rtnl.index, namespaces):
            rtnl.request(*message)


def line_requests(line: str, index_of, namespaces: "_OpenNamespaces") -> list:
    """The netlink requests of one plan line (only the forms the planner above writes); `index_of(name)`
    gives a link's index, `namespaces` opens a namespace for as long as the requests need it."""
    words = line.split()
    verb, rest = " ".join(words[:2]), words[2:]
    if verb == "link add":
        return [_link_add(rest, index_of, namespaces)]
    if verb == "link del":
        return [netlink.delete_link_message(rest[0])]
    if verb == "link set":
        return _link_set(rest[0], rest[1:])
    if verb in ("addr add", "addr del"):
        options, flags = _words(rest[1:])
        return [netlink.address_message(verb == "addr add", index_of(options["dev"]), ipnet.ip_interface(rest[0]),
                                        nodad="nodad" in flags)]
    if verb == "route add":
        options, _ = _words(rest[1:])
        gateway = ipnet.ip_address(options["via"]) if "via" in options else None
        return [netlink.route_message(index_of(options["dev"]), ipnet.ip_network(rest[0], strict=False), gateway)]
    raise CniError(INTERNAL, f"netplane-cni has no netlink request for {line!r}")


def _link_add(words: list, index_of, namespaces: "_OpenNamespaces") -> tuple:
    """`NAME [mtu N] address MAC [master BR] [up] type bridge|veth [peer name P address MAC [mtu N] netns PATH]`"""
    name = words[0]
    peer_at = words.index("peer") if "peer" in words else len(words)
    options, flags = _words(words[1:peer_at])
    master = index_of(options["master"]) if "master" in options else 0
    mtu = int(options["mtu"]) if "mtu" in options else None
    up = netlink.IFF_UP if "up" in flags else 0
    if options["type"] != "veth":
        return netlink.new_link_message(name, options["type"], options.get("address"), mtu, master, up)
    peer, _ = _words(words[peer_at + 1:])
    data = netlink.veth_peer(peer["name"], peer.get("address"), int(peer["mtu"]) if "mtu" in peer else None,
                             namespaces.open(peer["netns"]))
    return netlink.new_link_message(name, "veth", options.get("address"), mtu, master, up, data, echo=True)


def _learn_from_answers(line: str, answers: list) -> None:
    """A veth made with an echo tells its peer's index: the pod's socket need not ask for it."""
    words = line.split()
    if words[:2] != ["link", "add"] or "peer" not in words or not answers or not answers[0]:
        return
    peer, _ = _words(words[words.index("peer") + 1:])
    made = netlink.parse_link(answers[0][0])
    if made.name == words[2] and made.link:   # the host end's message: its IFLA_LINK is the peer
        _rtnl(peer["netns"]).indexes[peer["name"]] = made.link


def _link_set(name: str, words: list) -> list:
    """`NAME up|down`, `NAME promisc on|off`, `NAME type bridge_slave hairpin on|off`"""
    options, flags = _words(words)
    requests = []
    if flags & {"up", "down"}:
        requests.append(netlink.set_link_message(name, netlink.IFF_UP if "up" in flags else 0, netlink.IFF_UP))
    if "promisc" in options:
        requests.append(netlink.set_link_message(name, netlink.IFF_PROMISC if options["promisc"] == "on" else 0,
                                                 netlink.IFF_PROMISC))
    if "hairpin" in options:
        requests.append(netlink.set_link_message(name, 0, 0, netlink.bridge_port_hairpin(options["hairpin"] == "on")))
    return requests


class _OpenNamespaces:
    """`with _OpenNamespaces() as ns:` ns.open(path) -> a descriptor of that network namespace, kept
    open until the block ends (a request naming it by descriptor may be sent later in the block)."""

    def __init__(self):
        self.fds = {}

    def __enter__(self) -> "_OpenNamespaces":
        return self

    def open(self, path: str) -> int:
        if path not in self.fds:
            self.fds[path] = netlink.NetnsFd(path).__enter__()
        return self.fds[path].fd

    def __exit__(self, *exc) -> None:
        for opened in self.fds.values():
            opened.__exit__()


def read_sysctl(path: str) -> str | None:
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
    except OSError:
        return None
    try:
        return posix.read(fd, 64).decode().strip()
    except OSError:
        return None
    finally:
        posix.close(fd)


def write_sysctl(path: str, value: str) -> None:
    """/proc/sys/net follows the writer's network namespace: this sets it for the caller's (the node)."""
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise CniError(INTERNAL, f"cannot set {path} to {value}: {e}")


def random_mac() -> str:
    """A random locally administered unicast MAC (setting MACs ourselves means no read-back exec)."""
    octets = bytearray(posix.urandom(6))
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in octets)
