"""`netplane lab`: a multi-node cluster made of network namespaces on one machine.

The topology is a pure description (LabSpec -> nodes with names, addresses, roles); `up` is an
ordered list of steps that build it, every node joined by `netplane.node.join` (the code path the
Vagrant VMs run), and `down` removes everything by our marker (namespaces and links named by
`is_lab_name`, processes in those namespaces or started with the lab's environment marker,
/etc/netns entries, the lab directory), so it also cleans up after a crash of `up` halfway.

    host  np-br0 192.168.56.1/24  (the underlay: like a Vagrant private network)
      |-- np-u0 <-> eth0 in netns np-control-plane  192.168.56.10  apiserver :6443, controllers, scheduler,
      |                                                             LoadBalancer controller (+ etcd)
      |-- np-u1 <-> eth0 in netns np-worker-1       192.168.56.11
      `-- np-u2 <-> eth0 in netns np-worker-2       192.168.56.12
    every node: `netplane agent` (pods, CNI, pod network: routes or vxlan), `netplane proxy run`
    (nftables or iptables) and `netplane lb speaker` (ARP for LoadBalancer addresses)
    LoadBalancer addresses: 192.168.56.200-250 on the underlay, reached from the host like any client.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from netplane import netns, node as nodes_mod
from netplane.client import APIError, Client
from netplane.objects import pod_is_ready

LAB_DIR = Path(os.environ.get("NETPLANE_LAB_DIR", "/var/lib/netplane/lab"))
UNDERLAY_BRIDGE = "np-br0"
UNDERLAY = ipaddress.ip_network("192.168.56.0/24")
HOST_ADDRESS = "192.168.56.1"
FIRST_NODE_HOST = 10
API_PORT = 6443
CLUSTER_CIDR = nodes_mod.CLUSTER_CIDR
SERVICE_CIDR = nodes_mod.SERVICE_CIDR
LB_POOL = "192.168.56.200-192.168.56.250"
INGRESS_SERVICE = ("netplane-system", "ingress")
LAB_MARKER_ENV = "NETPLANE_LAB"  # every lab daemon carries it: `down` finds them even outside our namespaces
SPEAKER_HEALTH_PORT = 7473


@dataclass(frozen=True)
class LabNode:
    name: str
    index: int
    address: str
    control_plane: bool

    @property
    def netns(self) -> str:
        return f"np-{self.name}"

    @property
    def host_link(self) -> str:
        return f"np-u{self.index}"


@dataclass(frozen=True)
class LabOptions:
    nodes: int = 3
    proxy: str = "nftables"
    pod_network: str = "routes"
    store: str = "sqlite"
    lb_pool: tuple[str, ...] = (LB_POOL,)
    timeout: float = 90


def lab_nodes(count: int) -> list[LabNode]:
    """The lab's nodes: one control plane, then workers, addresses from the underlay."""
    if count < 1:
        raise ValueError("a lab needs at least one node")
    if count > 100:
        raise ValueError("--nodes: at most 100 (node addresses .10-.109 stay below the LoadBalancer pool)")
    nodes = []
    for i in range(count):
        name = "control-plane" if i == 0 else f"worker-{i}"
        address = str(UNDERLAY.network_address + FIRST_NODE_HOST + i)
        nodes.append(LabNode(name, i, address, control_plane=(i == 0)))
    return nodes


def api_url(nodes: list[LabNode]) -> str:
    return f"http://{nodes[0].address}:{API_PORT}"


def join_config(node: LabNode, options: LabOptions, server: str) -> nodes_mod.JoinConfig:
    """How the lab joins one of its nodes: the same `node join` as a VM, pointed at the lab's dirs."""
    return nodes_mod.JoinConfig(
        node_name=node.name, node_ip=node.address, server=server, control_plane=node.control_plane,
        pod_network=options.pod_network, proxy=options.proxy, store=options.store,
        etcd_data_dir=str(LAB_DIR / "etcd") if options.store == "etcd" and node.control_plane else "",
        lb_pool=options.lb_pool, cluster_cidr=CLUSTER_CIDR, service_cidr=SERVICE_CIDR,
        state_dir=str(LAB_DIR), cni_bin_dir=str(LAB_DIR / "cni-bin"), log_dir=str(LAB_DIR / "logs"),
        netns=node.netns, supervisor="process")


def kubeconfig_text(server: str) -> str:
    return (
        "apiVersion: v1\nkind: Config\ncurrent-context: netplane-lab\n"
        f"clusters:\n- name: netplane-lab\n  cluster:\n    server: {server}\n"
        "contexts:\n- name: netplane-lab\n  context:\n    cluster: netplane-lab\n    user: admin\n"
        "    namespace: default\nusers:\n- name: admin\n  user: {}\n"
    )


def is_lab_name(name: str) -> bool:
    """The lab's marker: namespaces np-control-plane, np-worker-N, np-pod-*; links np-br0, np-uN.

    Narrower than the bare `np-` prefix, so `lab down` never touches a test's own namespaces."""
    return bool(re.fullmatch(r"np-(control-plane|worker-\d+|pod-[0-9a-z-]+|br0|u\d+)", name))


def netns_mount_points(mountinfo: str) -> list[str]:
    """Mount points of lab namespaces (/run/netns/np-...) in /proc/self/mountinfo's text."""
    points = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4].startswith(netns.NETNS_DIR + "/"):
            if is_lab_name(os.path.basename(fields[4])):
                points.append(fields[4])
    return sorted(set(points))


def has_marker(environ: bytes, lab_dir: str) -> bool:
    """/proc/PID/environ's bytes carry NETPLANE_LAB=<this lab's dir>."""
    return f"{LAB_MARKER_ENV}={lab_dir}".encode() in environ.split(b"\0")


# --------------------------------------------------------------------------------------------
# The shell: build


def say(msg: str) -> None:
    print(msg, flush=True)


class Progress:
    """`[2/6] ...` lines with the time since `up` started."""

    def __init__(self, total: int):
        self.total, self.step, self.started = total, 0, time.monotonic()

    def __call__(self, msg: str) -> None:
        self.step += 1
        say(f"[{self.step}/{self.total}] {time.monotonic() - self.started:4.1f}s  {msg}")


def build_underlay(nodes: list[LabNode]) -> None:
    netns.run(["ip", "link", "add", UNDERLAY_BRIDGE, "type", "bridge"])
    netns.run(["ip", "addr", "add", f"{HOST_ADDRESS}/{UNDERLAY.prefixlen}", "dev", UNDERLAY_BRIDGE])
    netns.run(["ip", "link", "set", UNDERLAY_BRIDGE, "up"])
    for node in nodes:
        netns.add(node.netns)
        netns.run(["ip", "link", "add", node.host_link, "type", "veth", "peer", "name", "eth0",
                   "netns", node.netns])
        netns.run(["ip", "link", "set", node.host_link, "master", UNDERLAY_BRIDGE, "up"])
        for argv in (["ip", "addr", "add", f"{node.address}/{UNDERLAY.prefixlen}", "dev", "eth0"],
                     ["ip", "link", "set", "eth0", "up"],
                     ["ip", "route", "add", "default", "via", HOST_ADDRESS],
                     ["sysctl", "-qw", "net.ipv4.ip_forward=1"]):
            netns.run(argv, netns=node.netns)


def join_node(node: LabNode, options: LabOptions, server: str) -> None:
    config = join_config(node, options, server)
    # node join's own process supervisor, plus the lab's marker in every daemon's environment
    supervisor = nodes_mod.ProcessSupervisor(config.logs, str(LAB_DIR / "pids"), node.netns,
                                             env={**os.environ, LAB_MARKER_ENV: str(LAB_DIR)})
    nodes_mod.join(config, supervisor, timeout=30, progress=lambda _msg: None)


def http_ok(url: str, timeout: float = 1) -> bool:
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def http_answers(url: str, timeout: float = 1) -> bool:
    """Any HTTP answer at all (a 404 from the ingress counts: it is there)."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def wait_until(check, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; logs: {LAB_DIR / 'logs'}")
        time.sleep(interval)


async def cluster_state(server: str) -> dict:
    async with Client(server) as client:
        nodes = (await client.list("Node"))["items"]
        pods = (await client.list("Pod"))["items"]
        services = (await client.list("Service"))["items"]
    return {"nodes": nodes, "pods": pods, "services": services}


def node_ready(node: dict) -> bool:
    for cond in node.get("status", {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def load_balancer_ip(state: dict, namespace: str, name: str) -> str | None:
    from netplane.loadbalancer import ingress_ips
    for svc in state.get("services", []):
        if (svc["metadata"].get("namespace"), svc["metadata"]["name"]) == (namespace, name):
            ips = ingress_ips(svc)
            return ips[0] if ips else None
    return None


def system_ready(state: dict, node_count: int) -> bool:
    nodes = state["nodes"]
    ready_nodes = [n for n in nodes if node_ready(n) and n.get("spec", {}).get("podCIDR")]
    system = [p for p in state["pods"] if p["metadata"]["namespace"] in ("kube-system", "netplane-system")]
    return (len(ready_nodes) == node_count and len(system) >= 2
            and all(pod_is_ready(p) for p in system) and bool(load_balancer_ip(state, *INGRESS_SERVICE)))


def route_host_to_pods(state: dict) -> None:
    """Let the host reach pod IPs like a router on the underlay would (via each node's address)."""
    for node in state["nodes"]:
        cidr = node.get("spec", {}).get("podCIDR")
        address = next((a["address"] for a in node.get("status", {}).get("addresses", [])
                        if a.get("type") == "InternalIP"), None)
        if cidr and address:
            netns.run(["ip", "route", "replace", cidr, "via", address, "dev", UNDERLAY_BRIDGE])


def leftovers() -> list[str]:
    """What of a lab is on this machine: namespaces, links, mounts, /etc/netns entries, processes, the dir.
    (nft tables and iptables chains live only inside the lab's namespaces: they go with them.)"""
    found = [f"netns {n}" for n in netns.list_named() if is_lab_name(n)]
    found += [f"link {n}" for n in _our_links()]
    found += [f"mount {p}" for p in netns_mount_points(_read("/proc/self/mountinfo"))]
    if os.path.isdir("/etc/netns"):
        found += [f"/etc/netns/{n}" for n in sorted(os.listdir("/etc/netns")) if is_lab_name(n)]
    found += [f"process {pid}" for pid in sorted(_marked_pids())]
    if LAB_DIR.exists():
        found.append(f"dir {LAB_DIR}")
    return found


def up(options: LabOptions) -> int:
    found = leftovers()
    if found:
        what = "a lab is already up" if os.path.exists(f"/sys/class/net/{UNDERLAY_BRIDGE}") else \
            "an earlier lab left things behind"
        say(f"{what} ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}); "
            "`netplane lab down` first")
        return 1
    nodes = lab_nodes(options.nodes)
    server = api_url(nodes)
    LAB_DIR.mkdir(parents=True)
    (LAB_DIR / "nodes.json").write_text(json.dumps([n.__dict__ for n in nodes]))
    (LAB_DIR / "lab.json").write_text(json.dumps(asdict(options)))
    progress = Progress(5)
    try:
        progress(f"underlay: bridge {UNDERLAY_BRIDGE} {HOST_ADDRESS}/24, "
                 + ", ".join(f"{n.netns} {n.address}" for n in nodes))
        build_underlay(nodes)
        progress(f"control plane in {nodes[0].netns}: {'etcd, ' if options.store == 'etcd' else ''}"
                 f"apiserver {server} (store {options.store}), controller-manager, scheduler, lb-controller; "
                 f"system pods: kube-dns (10.96.0.10), ingress (LoadBalancer, NodePort 30080)")
        join_node(nodes[0], options, server)
        kubeconfig = LAB_DIR / "kubeconfig"
        kubeconfig.write_text(kubeconfig_text(server))
        progress(f"nodes joined: agent (pod network {options.pod_network}), proxy ({options.proxy}), "
                 f"lb-speaker on each of {', '.join(n.name for n in nodes)}")
        for node in nodes[1:]:
            join_node(node, options, server)
        progress("waiting for nodes Ready, system pods Ready, the ingress' LoadBalancer address")
        state = wait_until(lambda: _ready_state(server, options.nodes), options.timeout,
                           "nodes and system pods to be Ready", interval=0.2)
        route_host_to_pods(state)
        lb_ip = load_balancer_ip(state, *INGRESS_SERVICE)
        progress(f"waiting for http://{lb_ip}/ (the ingress) to answer the host")
        wait_until(lambda: http_answers(f"http://{lb_ip}/", timeout=0.5), 20, f"the ingress at http://{lb_ip}/")
    except (Exception, KeyboardInterrupt) as err:
        say(f"lab up failed: {err}\nlogs are in {LAB_DIR / 'logs'}; `netplane lab down` removes what was made")
        return 1
    say(f"lab is up in {time.monotonic() - progress.started:.1f}s; kubeconfig: {kubeconfig}")
    print_status(asyncio.run(cluster_state(server)), server, nodes)
    return 0


def _ready_state(server: str, node_count: int) -> dict | None:
    try:
        state = asyncio.run(cluster_state(server))
    except Exception:  # API or connection errors while things start
        return None
    return state if system_ready(state, node_count) else None


# --------------------------------------------------------------------------------------------
# Status


def speaker_announcements(nodes: list[LabNode]) -> dict[str, str]:
    """{address: node} from each speaker's /healthz ("ok: announcing a, b")."""
    import urllib.request
    found = {}
    for node in nodes:
        try:
            with urllib.request.urlopen(f"http://{node.address}:{SPEAKER_HEALTH_PORT}/healthz", timeout=0.5) as r:
                text = r.read().decode()
        except OSError:
            continue
        if "announcing " in text:
            for ip in text.split("announcing ", 1)[1].strip().split(", "):
                if ip and ip != "nothing":
                    found[ip] = node.name
    return found


def print_status(state: dict, server: str, nodes: list[LabNode] | None = None) -> None:
    say(f"API server: {server}   kubeconfig: {LAB_DIR / 'kubeconfig'}")
    say(f"{'NODE':<16}{'ADDRESS':<16}{'POD CIDR':<16}{'READY':<7}NAMESPACE")
    for node in sorted(state["nodes"], key=lambda n: n["metadata"]["name"]):
        name = node["metadata"]["name"]
        address = next((a["address"] for a in node.get("status", {}).get("addresses", [])
                        if a.get("type") == "InternalIP"), "")
        say(f"{name:<16}{address:<16}{node.get('spec', {}).get('podCIDR', ''):<16}"
            f"{str(node_ready(node)):<7}np-{name}")
    say(f"{'POD':<44}{'READY':<7}{'IP':<15}NODE")
    for pod in sorted(state["pods"], key=lambda p: (p["metadata"]["namespace"], p["metadata"]["name"])):
        ident = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
        say(f"{ident:<44}{str(pod_is_ready(pod)):<7}{pod.get('status', {}).get('podIP', ''):<15}"
            f"{pod.get('spec', {}).get('nodeName', '')}")
    announced = speaker_announcements(nodes or [])
    exposed = [s for s in state.get("services", []) if s["spec"].get("type") in ("NodePort", "LoadBalancer")]
    if exposed:
        say(f"{'SERVICE':<44}{'FROM THE HOST':<44}ANNOUNCED BY")
    for svc in sorted(exposed, key=lambda s: (s["metadata"]["namespace"], s["metadata"]["name"])):
        from netplane.loadbalancer import ingress_ips
        ident = f"{svc['metadata']['namespace']}/{svc['metadata']['name']}"
        ports = [p for p in svc["spec"].get("ports", [])]
        where = [f"{ip}:{p['port']}" for ip in ingress_ips(svc) for p in ports]
        where += [f"<node>:{p['nodePort']}" for p in ports if p.get("nodePort")]
        by = ", ".join(sorted({announced.get(ip, "-") for ip in ingress_ips(svc)})) or "-"
        pending = " (pending)" if svc["spec"]["type"] == "LoadBalancer" and not ingress_ips(svc) else ""
        say(f"{ident:<44}{' '.join(where) + pending:<44}{by}")


def _lab_nodes_on_disk() -> list[LabNode]:
    return [LabNode(**n) for n in json.loads((LAB_DIR / "nodes.json").read_text())]


def status() -> int:
    if not (LAB_DIR / "kubeconfig").exists():
        say("no lab is up (`netplane lab up` makes one)")
        return 1
    nodes = _lab_nodes_on_disk()
    server = api_url(nodes)
    try:
        options = json.loads((LAB_DIR / "lab.json").read_text())
        say(f"pod network {options['pod_network']}, proxy {options['proxy']}, store {options['store']}, "
            f"LoadBalancer pool {','.join(options['lb_pool'])}")
    except (OSError, ValueError, KeyError):
        pass
    try:
        state = asyncio.run(cluster_state(server))
    except Exception as err:
        say(f"the lab's API server at {server} does not answer: {err}")
        return 1
    print_status(state, server, nodes)
    return 0


# --------------------------------------------------------------------------------------------
# Tear down


def down() -> int:
    """Remove everything of ours, found by marker, whatever state `up` reached (or a crash left)."""
    removed = []
    for pid, _name in _recorded_pids():  # daemons first, gently: they clean up pods' sandboxes
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    names: list[str] = []
    killed: set[int] = set()
    # Until no new namespace shows up: a sandbox being made when we listed (an `ip netns add` a daemon
    # had already started) appears only after its maker is killed.
    for attempt in range(5):
        new = [n for n in netns.list_named() if is_lab_name(n) and n not in names]
        if attempt and not new:
            break
        names += new
        batch = _kill_everything(names)
        killed |= batch
        try:  # SIGKILL is asynchronous: wait until they are gone, so "down" means down
            wait_until(lambda: not any(_alive(pid) for pid in batch), 5, "the lab's processes to exit", 0.05)
        except TimeoutError as err:
            say(f"warning: {err}")
    if killed:
        removed.append(f"{len(killed)} processes")
    for name in names:
        netns.run(["ip", "netns", "delete", name], check=False)
        removed.append(f"netns {name}")
    for point in netns_mount_points(_read("/proc/self/mountinfo")):  # a mount whose file was lost
        netns.run(["umount", "-l", point], check=False)
        removed.append(f"mount {point}")
    for link in _our_links():
        netns.run(["ip", "link", "delete", link], check=False)
        removed.append(f"link {link}")
    # A veth goes away with its peer's namespace, but the kernel does it asynchronously.
    try:
        wait_until(lambda: not _our_links(), 5, "the lab's links to disappear", interval=0.05)
    except TimeoutError as err:
        say(f"warning: {err}")
    for path in sorted(Path("/etc/netns").glob("np-*")) if Path("/etc/netns").exists() else []:
        if is_lab_name(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"{path}")
    if LAB_DIR.exists():
        shutil.rmtree(LAB_DIR, ignore_errors=True)
        removed.append(f"dir {LAB_DIR}")
    say("lab down: removed " + (", ".join(removed) if removed else "nothing (no lab was up)"))
    return 0


def _kill_everything(names: list[str]) -> set[int]:
    """SIGKILL every process in the lab's namespaces or carrying the lab's marker; their pids."""
    pids = {pid for name in names for pid in netns.pids(name)} | _marked_pids()
    pids.discard(os.getpid())
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def _marked_pids() -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if has_marker(f.read(), str(LAB_DIR)) and _alive(int(entry)):
                    found.add(int(entry))
        except OSError:
            continue
    return found


def _recorded_pids() -> list[tuple[int, str]]:
    try:
        lines = (LAB_DIR / "pids").read_text().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        pid, _, name = line.partition(" ")
        if pid.isdigit():  # a line cut short by a crash is skipped
            pids.append((int(pid), name))
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _our_links() -> list[str]:
    return [name for name in sorted(os.listdir("/sys/class/net")) if is_lab_name(name)]


# --------------------------------------------------------------------------------------------
# exec and shell


def target_netns(target: str, namespace: str) -> str | None:
    """A node's namespace (by node name) or a pod's (by pod name in `namespace`)."""
    if is_lab_name(f"np-{target}") and netns.exists(f"np-{target}"):
        return f"np-{target}"
    return pod_netns(target, namespace)


def exec_in(target: str, namespace: str, command: list[str]) -> int:
    """Run a command in a node's namespace (by node name) or a pod's (by pod name)."""
    ns = target_netns(target, namespace)
    if ns is None:
        say(f"no node or pod named {target!r} in namespace {namespace!r}")
        return 1
    return subprocess.call(netns.in_netns(ns, command))


def shell_in(target: str, namespace: str) -> int:
    """An interactive shell in a node's or pod's namespace (`ip netns exec`: a pod's resolv.conf too)."""
    ns = target_netns(target, namespace)
    if ns is None:
        say(f"no node or pod named {target!r} in namespace {namespace!r}")
        return 1
    shell = os.environ.get("SHELL") or "/bin/bash"
    if not os.path.exists(shell):
        shell = "/bin/sh"
    env = {**os.environ, "PS1": f"[lab {target}] \\w# ", "NETPLANE_LAB_TARGET": target}
    argv = [shell, "--norc", "-i"] if shell.endswith("bash") else [shell, "-i"]
    say(f"shell in {ns} ({target}); dig, curl, nft, conntrack{', tcpdump' if shutil.which('tcpdump') else ''} "
        "see this namespace; exit to leave")
    return subprocess.call(netns.in_netns(ns, argv), env=env)


def pod_netns(name: str, namespace: str) -> str | None:
    from netplane.agent import pod_netns_name
    if not (LAB_DIR / "nodes.json").exists():
        return None

    async def fetch():
        async with Client(api_url(_lab_nodes_on_disk())) as client:
            return await client.get("Pod", name, namespace)
    try:
        pod = asyncio.run(fetch())
    except (APIError, OSError):
        return None
    except Exception:  # the API server is not answering
        return None
    ns = pod_netns_name(pod)
    return ns if netns.exists(ns) else None


# --------------------------------------------------------------------------------------------
# CLI


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="netplane lab")
    sub = top.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="bring up a lab of network-namespace nodes")
    p_up.add_argument("--nodes", type=int, default=3)
    p_up.add_argument("--proxy", choices=nodes_mod.PROXY_BACKENDS, default="nftables",
                      help="the service proxy's backend on every node")
    p_up.add_argument("--pod-network", choices=nodes_mod.POD_NETWORKS, default="routes",
                      help="routes (pod CIDRs via node addresses, like flannel host-gw) or vxlan (an overlay)")
    p_up.add_argument("--store", choices=nodes_mod.STORES, default="sqlite",
                      help="the API server's store: embedded SQLite, or etcd run in the control plane")
    p_up.add_argument("--lb-pool", action="append", default=[], metavar="RANGE",
                      help=f"LoadBalancer address pool (A-B or CIDR, repeat; default {LB_POOL})")
    p_up.add_argument("--timeout", type=float, default=90)
    sub.add_parser("down", help="remove everything the lab made")
    sub.add_parser("status", help="nodes, pods, addresses, what answers where")
    sub.add_parser("kubeconfig", help="print the kubeconfig's path")
    p_exec = sub.add_parser("exec", help="run a command in a pod's or node's namespace")
    p_exec.add_argument("target")
    p_exec.add_argument("-n", "--namespace", default="default")
    p_shell = sub.add_parser("shell", help="an interactive shell in a pod's or node's namespace")
    p_shell.add_argument("target")
    p_shell.add_argument("-n", "--namespace", default="default")
    return top


def main(argv: list[str]) -> int:
    top = parser()
    command: list[str] = []
    if "--" in argv:  # everything after -- is the command, flags and all
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    args = top.parse_args(argv)
    if args.cmd == "up":
        try:
            lab_nodes(args.nodes)
            options = LabOptions(nodes=args.nodes, proxy=args.proxy, pod_network=args.pod_network,
                                 store=args.store, lb_pool=tuple(args.lb_pool) or (LB_POOL,), timeout=args.timeout)
            from netplane.loadbalancer import Pool, PoolError
            Pool.parse(list(options.lb_pool))
        except (ValueError, PoolError) as err:
            top.error(str(err))
        return up(options)
    if args.cmd == "down":
        return down()
    if args.cmd == "status":
        return status()
    if args.cmd == "kubeconfig":
        print(LAB_DIR / "kubeconfig")
        return 0
    if args.cmd == "shell":
        return shell_in(args.target, args.namespace)
    if not command:
        top.error("exec needs a command after --")
    return exec_in(args.target, args.namespace, command)
