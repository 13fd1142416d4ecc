"""`netplane-cni`: the CNI plugin executable. The verb table is the program.

A runtime execs it with CNI_* variables and the network config on stdin; it prints a result (or the
spec's error JSON) on stdout. ADD is a short list of steps on an undo stack, so a failed ADD leaves
nothing behind; DEL treats "already gone" as done. Every command holds the network's lock, so
parallel ADDs of many pods are safe (and the bridge and the masquerade table are created and removed
by one pod at a time).

Kept light on purpose: a plugin is exec'd once per pod, so this module and everything it imports use
only small stdlib modules, mostly their C cores (see `python -X importtime -m netplane.cni.plugin`;
the modules ADD and DEL load even go without `from __future__ import annotations`, whose import costs
0.2 ms). Links, addresses and routes go to the kernel over netlink from this process (link.py,
netlink.py); only ipMasq (nft) and CHECK (ip) exec a tool. Under a node agent, the launcher hands ADD
and DEL to the agent's resident helper (helper.py), which runs `run` below with everything loaded.
"""
import posix
import sys
from _sha1 import sha1  # hashlib would load OpenSSL (~5 ms) on every exec

from . import jsonlite as json  # json without its ~9 ms import (see jsonlite)
from . import config, ipam, ipnet, link, paths
from .record import record
from .spec import (DECODING_FAILURE, INCOMPATIBLE_VERSION, INTERNAL, INVALID_ENVIRONMENT,
                   INVALID_NETWORK_CONFIG, LATEST_VERSION, NOT_AVAILABLE, CniError, Env, Interface, IPConfig,
                   Route, parse_env, result_json, version_json, version_tuple)

FAIL_AFTER_ENV = "NETPLANE_CNI_FAIL_AFTER"   # tests: fail ADD right after the named step
ADD_STEPS = ("ipam", "forward", "links", "pod", "masq")
HOST_VETH_PREFIX = "np-"
DELEGATED_LOCK_FILE = "netplane-cni.lock"
_FORWARDING = {4: "/proc/sys/net/ipv4/ip_forward", 6: "/proc/sys/net/ipv6/conf/all/forwarding"}


# address: an ipnet.Interface (10.244.1.5/24); gateway: an ipnet.Address or None
Assigned = record("Assigned", "address gateway")


def host_veth_name(container_id: str, ifname: str) -> str:
    """The host end's name follows from the attachment, so DEL and GC find it without state."""
    return HOST_VETH_PREFIX + sha1(f"{container_id}/{ifname}".encode()).hexdigest()[:12]


class Undo:
    """Steps taken so far, undone in reverse when a later step fails. Undo keeps going past errors."""

    def __init__(self):
        self.steps = []

    def push(self, what: str, fn, *args) -> None:
        self.steps.append((what, fn, args))

    def ip_line(self, netns, line: str) -> None:
        self.push(f"ip {line}", link.run_line, netns, line)

    def run(self) -> None:
        for what, fn, args in reversed(self.steps):
            try:
                fn(*args)
            except Exception as e:  # keep undoing the rest; say what could not be undone
                print(f"netplane-cni: undo {what!r} failed: {e}", file=sys.stderr)
        self.steps.clear()


def _maybe_fail(env: Env, step: str) -> None:
    if env.environ.get(FAIL_AFTER_ENV) == step:
        raise CniError(INTERNAL, f"injected failure after step {step!r} ({FAIL_AFTER_ENV})")


def _store(conf) -> ipam.Store:
    if conf.ipam.builtin:
        return ipam.Store(conf.ipam.data_dir, conf.name)
    # Our lock beside the delegated plugin's state, under another name: host-local flocks <dir>/lock
    # itself, and holding that one while it runs would deadlock.
    return ipam.Store(conf.ipam.data_dir, conf.name, DELEGATED_LOCK_FILE)


def _needs_version(conf, minimum: tuple, verb: str) -> None:
    if version_tuple(conf.cni_version) < minimum:
        raise CniError(INCOMPATIBLE_VERSION, f"cniVersion {conf.cni_version} does not have {verb} "
                                             f"(it needs {'.'.join(map(str, minimum))} or later)")


def _check_netns(env: Env) -> None:
    try:
        target = posix.stat(env.netns)
    except OSError:
        raise CniError(INVALID_ENVIRONMENT, f"CNI_NETNS {env.netns!r} does not exist")
    own = posix.stat("/proc/self/ns/net")
    if (target.st_dev, target.st_ino) == (own.st_dev, own.st_ino):
        # The pod's end would land next to the bridge, in the node itself.
        raise CniError(INVALID_ENVIRONMENT, f"CNI_NETNS {env.netns!r} is the plugin's own network namespace")


# ---- ADD ------------------------------------------------------------------------------------------

def cmd_add(env: Env, data: dict) -> dict:
    conf = config.parse_netconf(data)
    _check_netns(env)
    with _store(conf).locked() as store:
        undo = Undo()
        try:
            return _add(conf, env, store, undo)
        except BaseException:
            undo.run()
            raise


def _add(conf, env: Env, store: ipam.Store, undo: Undo) -> dict:
    assigned, routes, dns = _allocate(conf, env, store, undo)
    _maybe_fail(env, "ipam")
    if conf.is_gateway:
        _enable_forwarding({a.address.version for a in assigned}, undo)
    _maybe_fail(env, "forward")
    interfaces = _connect(conf, env, assigned, undo)
    _maybe_fail(env, "links")
    link.run_batch(link.plan_pod(env.ifname, [a.address for a in assigned], routes), undo.ip_line, env.netns)
    _maybe_fail(env, "pod")
    if conf.ip_masq:
        _masquerade(conf, env, assigned, store, undo)
    _maybe_fail(env, "masq")
    ips = [IPConfig(str(a.address), str(a.gateway) if a.gateway else None, 2) for a in assigned]
    return result_json(conf.cni_version, interfaces, ips, routes, dns or conf.dns)


def _connect(conf, env: Env, assigned: list, undo: Undo) -> list:
    """Bridge (with the gateways) and the veth pair, in one `ip -batch`; the result's interfaces.
    MACs are chosen here, so nothing has to be read back from the kernel."""
    bridge = link.show_link(conf.bridge)
    bridge_mac = bridge.mac if bridge else link.random_mac()
    host, host_mac, pod_mac = host_veth_name(env.container_id, env.ifname), link.random_mac(), link.random_mac()
    gateways = [_interface(f"{a.gateway}/{a.address.network.prefixlen}") for a in assigned if a.gateway]
    steps = link.plan_bridge(conf, bridge, gateways, bridge_mac)
    steps += link.plan_veth(conf, host, host_mac, env.ifname, pod_mac, env.netns)
    try:
        link.run_batch(steps, undo.ip_line)
    except CniError as e:
        if "File exists" in e.msg and f"link add {host}" in e.msg:
            raise CniError(e.code, f"interface {env.ifname} in the pod or host veth {host} already exists: {e.msg}")
        raise
    return [Interface(conf.bridge, bridge_mac), Interface(host, host_mac, mtu=conf.mtu),
            Interface(env.ifname, pod_mac, sandbox=env.netns, mtu=conf.mtu)]


def _allocate(conf, env: Env, store: ipam.Store, undo: Undo) -> tuple:
    """(addresses, routes for the pod, dns) from the built-in IPAM or the delegated plugin."""
    if not conf.ipam.builtin:
        from . import delegate
        result = delegate.call("ADD", conf.ipam.type, env, conf.raw)
        undo.push(f"ipam {conf.ipam.type} DEL", delegate.call, "DEL", conf.ipam.type, env, conf.raw)
        assigned = [Assigned(a, gw) for a, gw in delegate.addresses(result)]
        return assigned, _routes(conf, assigned, delegate.routes(result)), result.get("dns") or {}
    owner = env_owner(env)
    picks = ipam.plan(conf.ipam, store.allocations(), store.last_reserved(len(conf.ipam.range_sets)), owner)
    for pick in picks:
        if pick.new:
            store.reserve(pick, owner)
            undo.push(f"release {pick.ip}", store.release, pick.ip)
    assigned = [Assigned(_interface(p.cidr), p.range.gateway) for p in picks]
    return assigned, _routes(conf, assigned, conf.ipam.routes), {}


def _interface(cidr: str):
    return ipnet.ip_interface(cidr)


def _routes(conf, assigned: list, given) -> list:
    """The IPAM routes (RouteConf values; one without gw goes via the gateway of its family, as the
    reference plugins do), then a default route per family when isDefaultGateway."""
    gateway_of = {}
    for a in assigned:
        if a.gateway is not None:
            gateway_of.setdefault(a.address.version, a.gateway)
    routes = []
    for r in given:
        gw = r.gw or gateway_of.get(r.dst.version)
        routes.append(Route(str(r.dst), str(gw) if gw else None))
    if conf.is_default_gateway:
        for version, gateway in sorted(gateway_of.items()):
            default = "0.0.0.0/0" if version == 4 else "::/0"
            if not any(r.dst == default for r in routes):
                routes.append(Route(default, str(gateway)))
    return routes


def _enable_forwarding(versions: set, undo: Undo) -> None:
    for version in sorted(versions):
        path = _FORWARDING[version]
        before = link.read_sysctl(path)
        if before != "1":
            link.write_sysctl(path, "1")
            undo.push(f"{path}={before}", link.write_sysctl, path, before or "0")


def _masquerade(conf, env: Env, assigned: list, store: ipam.Store, undo: Undo) -> None:
    from . import masq   # nft is exec'd only with ipMasq: its module loads only then
    masq.apply(conf.name, _pod_subnets(conf, assigned))
    undo.push("masquerade table", _remove_masq_if_unused, conf, store, env_owner(env))


def _pod_subnets(conf, assigned: list) -> list:
    if conf.ipam.builtin:
        return [r.subnet for rs in conf.ipam.range_sets for r in rs.ranges]
    return sorted({a.address.network for a in assigned}, key=str)


def env_owner(env: Env) -> ipam.Owner:
    return ipam.Owner(env.container_id, env.ifname)


def _remove_masq_if_unused(conf, store: ipam.Store, leaving: ipam.Owner | None = None) -> None:
    """The table goes with the network's last pod (DEL, a failed ADD's undo) or on GC."""
    if conf.ipam.builtin:
        in_use = any(who != leaving for who in store.allocations().values())
    else:
        in_use = any(n.startswith(HOST_VETH_PREFIX) for n in link.links_with_master(conf.bridge))
    if not in_use:
        from . import masq
        masq.remove(conf.name)


# ---- DEL ------------------------------------------------------------------------------------------

def cmd_del(env: Env, data: dict) -> None:
    conf = config.parse_netconf(data)
    with _store(conf).locked() as store:
        host = host_veth_name(env.container_id, env.ifname)
        names = [host] + [n for n in _prev_host_links(conf) if n != host]
        # Done once the kernel has unregistered the pair; its ~20 ms clean-up goes on without us.
        found = [link.delete_link_detached(name) for name in names]
        if not any(found) and env.netns and paths.exists(env.netns):
            # The host end was renamed or made by someone else: remove the pod's end directly.
            link.delete_link(env.ifname, env.netns)
        if conf.ipam.builtin:
            store.release_owner(env.container_id, env.ifname)
        else:
            from . import delegate
            delegate.call("DEL", conf.ipam.type, env, conf.raw)
        if conf.ip_masq:
            _remove_masq_if_unused(conf, store)
    return None


def _prev_host_links(conf) -> list:
    """Host-side links named in prevResult (not the bridge, not the pod's end)."""
    prev = conf.prev_result or {}
    return [i.get("name") for i in prev.get("interfaces") or []
            if isinstance(i, dict) and i.get("name") and not i.get("sandbox") and i.get("name") != conf.bridge
            and str(i.get("name")).startswith(HOST_VETH_PREFIX)]


# ---- CHECK, STATUS, GC, VERSION ---------------------------------------------------------------------

def cmd_check(env: Env, data: dict) -> None:
    from . import check
    conf = config.parse_netconf(data)
    _needs_version(conf, (0, 4, 0), "CHECK")
    if not conf.prev_result:
        raise CniError(INVALID_NETWORK_CONFIG, "invalid network config: prevResult is required for CHECK")
    _check_netns(env)
    with _store(conf).locked() as store:
        problems = check.problems(conf, env, store, host_veth_name(env.container_id, env.ifname))
    if problems:
        raise CniError(INTERNAL, f"CHECK of {env.container_id}/{env.ifname} failed: " + "; ".join(problems))
    return None


def cmd_status(env: Env, data: dict) -> None:
    conf = config.parse_netconf(data)
    _needs_version(conf, (1, 1, 0), "STATUS")
    if not conf.ipam.builtin:
        from . import delegate
        delegate.call("STATUS", conf.ipam.type, env, conf.raw)
        return None
    from .proc import which
    for tool in ("ip", "nsenter") + (("nft",) if conf.ip_masq else ()):
        if which(tool) is None:
            raise CniError(NOT_AVAILABLE, f"{tool} is not installed")
    with _store(conf).locked() as store:
        taken = set(store.allocations())
    for range_set in conf.ipam.range_sets:
        if next((ip for ip in ipam.candidates(range_set) if ip not in taken), None) is None:
            raise CniError(NOT_AVAILABLE, f"no free address in {range_set.describe()}")
    return None


def cmd_gc(env: Env, data: dict) -> None:
    """Release every allocation and remove every host veth whose attachment is not in
    cni.dev/valid-attachments; drop the masquerade table when nothing is left."""
    conf = config.parse_netconf(data)
    _needs_version(conf, (1, 1, 0), "GC")
    keep = config.valid_attachments(data)
    keep_links = {host_veth_name(cid, ifname) for cid, ifname in keep}
    errors = []
    with _store(conf).locked() as store:
        for name in link.links_with_master(conf.bridge):
            if name.startswith(HOST_VETH_PREFIX) and name not in keep_links:
                try:
                    link.delete_link(name)
                except CniError as e:
                    errors.append(e.msg)
        if conf.ipam.builtin:
            for ip, who in store.allocations().items():
                if (who.container_id, who.ifname) not in keep:
                    store.release(ip)
        else:
            from . import delegate
            delegate.call("GC", conf.ipam.type, env, conf.raw)
        if conf.ip_masq:
            _remove_masq_if_unused(conf, store)
    if errors:
        raise CniError(INTERNAL, "GC: " + "; ".join(errors))
    return None


def cmd_version(env: Env, data: dict) -> dict:
    version = data.get("cniVersion") if isinstance(data.get("cniVersion"), str) else LATEST_VERSION
    return version_json(version or LATEST_VERSION)


VERBS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc,
         "VERSION": cmd_version}


# ---- the shell ------------------------------------------------------------------------------------

def _decode(raw: bytes, command: str) -> dict:
    if not raw.strip() and command == "VERSION":
        return {}
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise CniError(DECODING_FAILURE, f"network config on stdin is not valid JSON: {e}")
    if not isinstance(data, dict):
        raise CniError(DECODING_FAILURE, "network config on stdin must be a JSON object")
    return data


def run(environ, stdin: bytes) -> tuple:
    """One command: (exit code, what to print on stdout). Also the node helper's entry (helper.py)."""
    error_version = LATEST_VERSION
    try:
        env = parse_env(environ)
        data = _decode(stdin, env.command)
        if isinstance(data.get("cniVersion"), str) and data["cniVersion"]:
            error_version = data["cniVersion"]
        result = VERBS[env.command](env, data)
    except CniError as e:
        return 1, _json_line(e.to_json(error_version))
    except Exception as e:  # a bug: still answer in the spec's shape, with the trace on stderr
        import traceback
        traceback.print_exc()
        return 1, _json_line(CniError(INTERNAL, f"internal error: {type(e).__name__}: {e}").to_json(error_version))
    return 0, "" if result is None else _json_line(result)


def _json_line(obj: dict) -> str:
    return json.dumps(obj) + "\n"


def environment() -> dict:
    """os.environ's text, from posix.environ's bytes (decoded as os does: UTF-8, surrogateescape)."""
    return {key.decode("utf-8", "surrogateescape"): value.decode("utf-8", "surrogateescape")
            for key, value in posix.environ.items()}


def main(argv=None, stdin: bytes | None = None) -> int:
    code, out = run(environment(), sys.stdin.buffer.read() if stdin is None else stdin)
    sys.stdout.write(out)
    sys.stdout.flush()
    return code


def main_and_exit(stdin: bytes | None = None) -> None:
    """main(), then exit without the interpreter's finalization (tearing down every module and object
    costs ~1.5 ms per exec, for a process that is about to vanish). The launcher's entry point."""
    code = main(stdin=stdin)
    sys.stderr.flush()
    posix._exit(code)


if __name__ == "__main__":
    sys.exit(main())
