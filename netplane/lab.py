"""`netplane lab`: a multi-node cluster made of network namespaces on one machine.

The topology is a pure description (LabSpec -> nodes with names, addresses, roles); `up` is an
ordered list of steps that build it, and `down` removes everything by our marker (namespaces
`np-*`, links `np-*`, /etc/netns/np-*, the lab directory), so it also cleans up after a crash.

    host  np-br0 192.168.56.1/24  (the underlay: like a Vagrant private network)
      |-- np-u0 <-> eth0 in netns np-control-plane  192.168.56.10  apiserver :6443, controllers, scheduler
      |-- np-u1 <-> eth0 in netns np-worker-1       192.168.56.11
      `-- np-u2 <-> eth0 in netns np-worker-2       192.168.56.12
    every node: `netplane agent` (pods, CNI, routes to other nodes' pod CIDRs) + `netplane proxy run`
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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from netplane import netns
from netplane.client import APIError, Client
from netplane.objects import load_file, pod_is_ready

LAB_DIR = Path(os.environ.get("NETPLANE_LAB_DIR", "/var/lib/netplane/lab"))
UNDERLAY_BRIDGE = "np-br0"
UNDERLAY = ipaddress.ip_network("192.168.56.0/24")
HOST_ADDRESS = "192.168.56.1"
FIRST_NODE_HOST = 10
API_PORT = 6443
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/12"
SYSTEM_MANIFEST = Path(__file__).with_name("manifests") / "system.yaml"
CONTROL_PLANE_TAINT = "node-role.kubernetes.io/control-plane=:NoSchedule"
CONTROL_PLANE_LABEL = "node-role.kubernetes.io/control-plane="


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


def lab_nodes(count: int) -> list[LabNode]:
    """The lab's nodes: one control plane, then workers, addresses from the underlay."""
    if count < 1:
        raise ValueError("a lab needs at least one node")
    nodes = []
    for i in range(count):
        name = "control-plane" if i == 0 else f"worker-{i}"
        address = str(UNDERLAY.network_address + FIRST_NODE_HOST + i)
        nodes.append(LabNode(name, i, address, control_plane=(i == 0)))
    return nodes


def api_url(nodes: list[LabNode]) -> str:
    return f"http://{nodes[0].address}:{API_PORT}"


def kubeconfig_text(server: str) -> str:
    return (
        "apiVersion: v1\nkind: Config\ncurrent-context: netplane-lab\n"
        f"clusters:\n- name: netplane-lab\n  cluster:\n    server: {server}\n"
        "contexts:\n- name: netplane-lab\n  context:\n    cluster: netplane-lab\n    user: admin\n"
        "    namespace: default\nusers:\n- name: admin\n  user: {}\n"
    )


# --------------------------------------------------------------------------------------------
# The shell: build and tear down


def say(msg: str) -> None:
    print(msg, flush=True)


def netplane_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "netplane", *args]


def start_process(name: str, node: LabNode, argv: list[str], env: dict | None = None) -> int:
    """Start a lab daemon inside a node's namespace, logging to the lab dir; returns its pid."""
    logs = LAB_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file = open(logs / f"{name}.log", "ab")
    proc = subprocess.Popen(netns.enter(node.netns, argv), stdout=log_file, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, **(env or {})})
    log_file.close()
    with open(LAB_DIR / "pids", "a") as f:
        f.write(f"{proc.pid} {name}\n")
    return proc.pid


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


def start_control_plane(node: LabNode) -> str:
    server = f"http://{node.address}:{API_PORT}"
    start_process("apiserver", node, netplane_argv(
        "apiserver", "--listen", f"{node.address}:{API_PORT}", "--db", str(LAB_DIR / "store.db"),
        "--advertise-address", node.address))
    wait_until(lambda: http_ok(f"{server}/healthz"), 20, "the API server to answer /healthz")
    start_process("controller-manager", node, netplane_argv(
        "controller-manager", "--server", server, "--cluster-cidr", CLUSTER_CIDR))
    start_process("scheduler", node, netplane_argv("scheduler", "--server", server))
    return server


def install_cni_plugin(directory: Path) -> None:
    """The fast netplane-cni launcher (no site start-up), as a CNI runtime finds plugins: in a bin dir."""
    from netplane.cni.install import install
    directory.mkdir(parents=True, exist_ok=True)
    install(str(directory))


def start_node(node: LabNode, server: str) -> None:
    state = LAB_DIR / "nodes" / node.name
    state.mkdir(parents=True, exist_ok=True)
    agent = ["agent", "--server", server, "--node-name", node.name, "--node-ip", node.address,
             "--state-dir", str(state), "--health-listen", f"{node.address}:10248",
             "--cni-bin-dir", str(LAB_DIR / "cni-bin")]
    if node.control_plane:
        agent += ["--register-with-taints", CONTROL_PLANE_TAINT, "--node-labels", CONTROL_PLANE_LABEL]
    start_process(f"agent-{node.name}", node, netplane_argv(*agent))
    start_process(f"proxy-{node.name}", node, netplane_argv(
        "proxy", "run", "--server", server, "--node-name", node.name, "--node-ip", node.address,
        "--cluster-cidr", CLUSTER_CIDR, "--service-cidr", SERVICE_CIDR,
        "--health-listen", f"{node.address}:10256"))


def http_ok(url: str) -> bool:
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
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


async def apply_objects(server: str, objects: list[dict]) -> None:
    async with Client(server) as client:
        for obj in objects:
            try:
                await client.create(obj)
            except APIError as err:
                if err.status != 409:
                    raise


async def cluster_state(server: str) -> dict:
    async with Client(server) as client:
        nodes = (await client.list("Node"))["items"]
        pods = (await client.list("Pod"))["items"]
    return {"nodes": nodes, "pods": pods}


def node_ready(node: dict) -> bool:
    for cond in node.get("status", {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def system_ready(state: dict, node_count: int) -> bool:
    nodes = state["nodes"]
    ready_nodes = [n for n in nodes if node_ready(n) and n.get("spec", {}).get("podCIDR")]
    system = [p for p in state["pods"] if p["metadata"]["namespace"] in ("kube-system", "netplane-system")]
    return (len(ready_nodes) == node_count and len(system) >= 2
            and all(pod_is_ready(p) for p in system))


def route_host_to_pods(state: dict) -> None:
    """Let the host reach pod IPs like a router on the underlay would (via each node's address)."""
    for node in state["nodes"]:
        cidr = node.get("spec", {}).get("podCIDR")
        address = next((a["address"] for a in node.get("status", {}).get("addresses", [])
                        if a.get("type") == "InternalIP"), None)
        if cidr and address:
            netns.run(["ip", "route", "replace", cidr, "via", address, "dev", UNDERLAY_BRIDGE])


def up(node_count: int, timeout: float) -> int:
    if os.path.exists(f"/sys/class/net/{UNDERLAY_BRIDGE}"):
        say(f"a lab is already up (bridge {UNDERLAY_BRIDGE} exists); `netplane lab down` first")
        return 1
    started = time.monotonic()
    nodes = lab_nodes(node_count)
    shutil.rmtree(LAB_DIR, ignore_errors=True)
    LAB_DIR.mkdir(parents=True)
    (LAB_DIR / "nodes.json").write_text(json.dumps([n.__dict__ for n in nodes]))
    try:
        say(f"[1/5] underlay: bridge {UNDERLAY_BRIDGE} {HOST_ADDRESS}/24, "
            + ", ".join(f"{n.netns} {n.address}" for n in nodes))
        build_underlay(nodes)
        say(f"[2/5] control plane in {nodes[0].netns}: apiserver {api_url(nodes)}, controller-manager, scheduler")
        server = start_control_plane(nodes[0])
        install_cni_plugin(LAB_DIR / "cni-bin")
        kubeconfig = LAB_DIR / "kubeconfig"
        kubeconfig.write_text(kubeconfig_text(server))
        say(f"[3/5] nodes: agent + proxy on each of {', '.join(n.name for n in nodes)}")
        for node in nodes:
            start_node(node, server)
        say("[4/5] system pods: kube-dns (10.96.0.10), ingress (NodePort 30080)")
        asyncio.run(apply_objects(server, load_file(SYSTEM_MANIFEST)))
        say("[5/5] waiting for nodes Ready and system pods Ready")
        state = wait_until(lambda: _ready_state(server, node_count), timeout, "nodes and system pods to be Ready",
                           interval=0.2)
        route_host_to_pods(state)
    except (Exception, KeyboardInterrupt) as err:
        say(f"lab up failed: {err}\nlogs are in {LAB_DIR / 'logs'}; `netplane lab down` removes what was made")
        return 1
    say(f"lab is up in {time.monotonic() - started:.1f}s; kubeconfig: {kubeconfig}")
    print_status(state, server)
    return 0


def _ready_state(server: str, node_count: int) -> dict | None:
    try:
        state = asyncio.run(cluster_state(server))
    except (APIError, OSError, asyncio.TimeoutError):
        return None
    except Exception:  # aiohttp connection errors while things start
        return None
    return state if system_ready(state, node_count) else None


def print_status(state: dict, server: str) -> None:
    say(f"API server: {server}")
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


def status() -> int:
    if not (LAB_DIR / "kubeconfig").exists():
        say("no lab is up (`netplane lab up` makes one)")
        return 1
    nodes = [LabNode(**n) for n in json.loads((LAB_DIR / "nodes.json").read_text())]
    server = api_url(nodes)
    try:
        state = asyncio.run(cluster_state(server))
    except Exception as err:
        say(f"the lab's API server at {server} does not answer: {err}")
        return 1
    print_status(state, server)
    return 0


def down() -> int:
    """Remove everything of ours, found by marker, whatever state `up` reached."""
    removed = []
    for pid, _name in _recorded_pids():
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    names = [n for n in netns.list_named() if is_lab_name(n)]
    killed = [pid for name in names for pid in netns.pids(name)]
    for name in names:
        netns.kill_processes(name)
    try:  # SIGKILL is asynchronous: wait until they are gone, so "down" means down
        wait_until(lambda: not any(_alive(pid) for pid in killed), 5, "the lab's processes to exit", 0.05)
    except TimeoutError as err:
        say(f"warning: {err}")
    for name in names:
        netns.run(["ip", "netns", "delete", name], check=False)
        removed.append(f"netns {name}")
    for link in _our_links():
        netns.run(["ip", "link", "delete", link], check=False)
        removed.append(f"link {link}")
    # A veth goes away with its peer's namespace, but the kernel does it asynchronously.
    try:
        wait_until(lambda: not _our_links(), 5, "the lab's links to disappear", interval=0.05)
    except TimeoutError as err:
        say(f"warning: {err}")
    for path in Path("/etc/netns").glob("np-*") if Path("/etc/netns").exists() else []:
        if is_lab_name(path.name):
            shutil.rmtree(path, ignore_errors=True)
    if LAB_DIR.exists():
        shutil.rmtree(LAB_DIR, ignore_errors=True)
        removed.append(f"dir {LAB_DIR}")
    say("lab down: removed " + (", ".join(removed) if removed else "nothing (no lab was up)"))
    return 0


def _recorded_pids() -> list[tuple[int, str]]:
    try:
        lines = (LAB_DIR / "pids").read_text().splitlines()
    except OSError:
        return []
    return [(int(pid), name) for pid, name in (line.split(" ", 1) for line in lines if line)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def is_lab_name(name: str) -> bool:
    """The lab's marker: namespaces np-control-plane, np-worker-N, np-pod-*; links np-br0, np-uN.

    Narrower than the bare `np-` prefix, so `lab down` never touches a test's own namespaces."""
    return bool(re.fullmatch(r"np-(control-plane|worker-\d+|pod-[0-9a-z-]+|br0|u\d+)", name))


def _our_links() -> list[str]:
    return [name for name in sorted(os.listdir("/sys/class/net")) if is_lab_name(name)]


def exec_in(target: str, namespace: str, command: list[str]) -> int:
    """Run a command in a node's namespace (by node name) or a pod's (by pod name)."""
    if netns.exists(f"np-{target}"):
        ns = f"np-{target}"
    else:
        ns = pod_netns(target, namespace)
        if ns is None:
            say(f"no node or pod named {target!r} in namespace {namespace!r}")
            return 1
    return subprocess.call(netns.in_netns(ns, command))


def pod_netns(name: str, namespace: str) -> str | None:
    from netplane.agent import pod_netns_name
    nodes = [LabNode(**n) for n in json.loads((LAB_DIR / "nodes.json").read_text())]

    async def fetch():
        async with Client(api_url(nodes)) as client:
            return await client.get("Pod", name, namespace)
    try:
        pod = asyncio.run(fetch())
    except APIError:
        return None
    ns = pod_netns_name(pod)
    return ns if netns.exists(ns) else None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="netplane lab")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="bring up a lab of network-namespace nodes")
    p_up.add_argument("--nodes", type=int, default=3)
    p_up.add_argument("--timeout", type=float, default=90)
    sub.add_parser("down", help="remove everything the lab made")
    sub.add_parser("status", help="nodes, pods and addresses")
    sub.add_parser("kubeconfig", help="print the kubeconfig's path")
    p_exec = sub.add_parser("exec", help="run a command in a pod's or node's namespace")
    p_exec.add_argument("target")
    p_exec.add_argument("-n", "--namespace", default="default")
    command: list[str] = []
    if "--" in argv:  # everything after -- is the command, flags and all
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    args = parser.parse_args(argv)
    if args.cmd == "up":
        return up(args.nodes, args.timeout)
    if args.cmd == "down":
        return down()
    if args.cmd == "status":
        return status()
    if args.cmd == "kubeconfig":
        print(LAB_DIR / "kubeconfig")
        return 0
    if not command:
        parser.error("exec needs a command after --")
    return exec_in(args.target, args.namespace, command)
