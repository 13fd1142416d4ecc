"""`netplane node join`: the one code path that makes a machine (or a lab namespace) a node.

    netplane node join --server URL --node-name NAME --node-ip IP
                       [--pod-network routes|vxlan] [--proxy nftables|iptables] [...]
    netplane node join --control-plane --node-name NAME --node-ip IP
                       [--store sqlite|etcd] [--etcd-data-dir DIR | --etcd-endpoints URLS] [--lb-pool RANGE]
    netplane node reset [--state-dir DIR] [--supervisor systemd]   # stop our daemons, remove our rules

`netplane lab up` joins every namespace node through `join()`; the Vagrant provisioning runs the
command on each VM. What it does: install the CNI launcher, then start, in order, the daemons of
the node's role (pure `plan()`: a list of Daemons), each with the same flags everywhere; with
--control-plane first etcd (when it runs it), the API server (waiting for /healthz), the
controller manager, the scheduler and the LoadBalancer controller. A supervisor starts them:
`process` (detached processes, optionally inside a named network namespace, logs in --log-dir,
pids in --state-dir/pids) or `systemd` (a unit per daemon, enabled, restarted on failure).
"""
from __future__ import annotations

import argparse
import copy
import ipaddress
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from netplane import netns

API_PORT = 6443
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/12"
CONTROL_PLANE_TAINT = "node-role.kubernetes.io/control-plane=:NoSchedule"
CONTROL_PLANE_LABEL = "node-role.kubernetes.io/control-plane="
DEFAULT_STATE_DIR = "/var/lib/netplane"
SYSTEMD_DIR = Path("/etc/systemd/system")
UNIT_PREFIX = "netplane-"
POD_NETWORKS = ("routes", "vxlan")
PROXY_BACKENDS = ("nftables", "iptables")
STORES = ("sqlite", "etcd")
ETCD_CLIENT_URL = "http://127.0.0.1:2379"


@dataclass(frozen=True)
class JoinConfig:
    node_name: str
    node_ip: str
    server: str = ""
    control_plane: bool = False
    pod_network: str = "routes"
    proxy: str = "nftables"
    store: str = "sqlite"
    etcd_endpoints: str = ""
    etcd_data_dir: str = ""
    lb_pool: tuple[str, ...] = ()
    cluster_cidr: str = CLUSTER_CIDR
    service_cidr: str = SERVICE_CIDR
    state_dir: str = DEFAULT_STATE_DIR
    cni_bin_dir: str = ""
    log_dir: str = ""
    netns: str | None = None
    supervisor: str = "process"
    system_manifest: str = str(Path(__file__).with_name("manifests") / "system.yaml")  # control plane applies it
    dns_upstream: str = ""  # where kube-dns forwards names outside the cluster ('' : it refuses them)
    python: str = field(default_factory=lambda: sys.executable)

    @property
    def api_server(self) -> str:
        return self.server or f"http://{self.node_ip}:{API_PORT}"

    @property
    def cni_bin(self) -> str:
        return self.cni_bin_dir or os.path.join(self.state_dir, "cni-bin")

    @property
    def logs(self) -> str:
        return self.log_dir or os.path.join(self.state_dir, "logs")

    @property
    def node_state_dir(self) -> str:
        return os.path.join(self.state_dir, "nodes", self.node_name)


@dataclass(frozen=True)
class Daemon:
    name: str                 # log file and unit name: agent-worker-1 -> netplane-agent-worker-1
    argv: tuple[str, ...]
    ready_url: str = ""       # wait until this answers 200 before starting the next daemon


# ================================================================ pure core: what runs where

def validate(config: JoinConfig) -> None:
    """Raise ValueError naming the flag that is wrong."""
    for flag, value in (("--node-ip", config.node_ip),):
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{flag} {value!r} is not an IP address") from None
    for flag, value in (("--cluster-cidr", config.cluster_cidr), ("--service-cidr", config.service_cidr)):
        try:
            ipaddress.ip_network(value)
        except ValueError:
            raise ValueError(f"{flag} {value!r} is not a CIDR") from None
    if not config.node_name:
        raise ValueError("--node-name is empty")
    if not config.control_plane and not config.server:
        raise ValueError("--server is required to join a worker (the control plane's API URL)")
    if config.pod_network not in POD_NETWORKS:
        raise ValueError(f"--pod-network {config.pod_network!r}: one of {', '.join(POD_NETWORKS)}")
    if config.proxy not in PROXY_BACKENDS:
        raise ValueError(f"--proxy {config.proxy!r}: one of {', '.join(PROXY_BACKENDS)}")
    if config.store not in STORES:
        raise ValueError(f"--store {config.store!r}: one of {', '.join(STORES)}")
    if config.lb_pool:
        from netplane.loadbalancer import Pool
        Pool.parse(list(config.lb_pool))


def control_plane_daemons(config: JoinConfig) -> list[Daemon]:
    py = (config.python, "-m", "netplane")
    server = config.api_server
    daemons = []
    store = ("--store", "sqlite", "--db", os.path.join(config.state_dir, "store.db"))
    if config.store == "etcd":
        endpoints = config.etcd_endpoints or ETCD_CLIENT_URL
        store = ("--store", "etcd", "--etcd-endpoints", endpoints)
        if config.etcd_data_dir:  # we run etcd ourselves (else: it is somebody else's service)
            daemons.append(Daemon("etcd", etcd_argv(config), ready_url=f"{ETCD_CLIENT_URL}/health"))
    daemons += [
        Daemon("apiserver", (*py, "apiserver", "--listen", f"{config.node_ip}:{API_PORT}", *store,
                             "--advertise-address", config.node_ip), ready_url=f"{server}/healthz"),
        Daemon("controller-manager", (*py, "controller-manager", "--server", server,
                                      "--cluster-cidr", config.cluster_cidr)),
        Daemon("scheduler", (*py, "scheduler", "--server", server)),
        Daemon("lb-controller", (*py, "lb", "controller", "--server", server,
                                 *(arg for pool in config.lb_pool for arg in ("--pool", pool)))),
    ]
    return daemons


def etcd_argv(config: JoinConfig) -> tuple[str, ...]:
    peer = "http://127.0.0.1:2380"
    return ("etcd", "--name", config.node_name, "--data-dir", config.etcd_data_dir,
            "--listen-client-urls", ETCD_CLIENT_URL, "--advertise-client-urls", ETCD_CLIENT_URL,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{config.node_name}={peer}", "--log-level", "warn")


def node_daemons(config: JoinConfig) -> list[Daemon]:
    py = (config.python, "-m", "netplane")
    server, name, ip = config.api_server, config.node_name, config.node_ip
    agent = [*py, "agent", "--server", server, "--node-name", name, "--node-ip", ip,
             "--state-dir", config.node_state_dir, "--health-listen", f"{ip}:10248",
             "--cni-bin-dir", config.cni_bin, "--pod-network", config.pod_network]
    if config.control_plane:
        agent += ["--register-with-taints", CONTROL_PLANE_TAINT, "--node-labels", CONTROL_PLANE_LABEL]
    proxy = [*py, "proxy", "run", "--server", server, "--node-name", name, "--node-ip", ip,
             "--backend", config.proxy, "--cluster-cidr", config.cluster_cidr,
             "--service-cidr", config.service_cidr, "--health-listen", f"{ip}:10256"]
    speaker = [*py, "lb", "speaker", "--server", server, "--node-name", name, "--node-ip", ip,
               "--agent-health-url", f"http://{ip}:10248/healthz", "--health-listen", f"{ip}:7473"]
    return [Daemon(f"agent-{name}", tuple(agent)), Daemon(f"proxy-{name}", tuple(proxy)),
            Daemon(f"lb-speaker-{name}", tuple(speaker))]


def plan(config: JoinConfig) -> list[Daemon]:
    """Every daemon this node runs, in start order."""
    return (control_plane_daemons(config) if config.control_plane else []) + node_daemons(config)


def systemd_unit(daemon: Daemon, netns_name: str | None = None) -> str:
    argv = netns.enter(netns_name, daemon.argv) if netns_name else list(daemon.argv)
    return ("[Unit]\n"
            f"Description=netplane {daemon.name}\n"
            "After=network-online.target\nWants=network-online.target\n\n"
            "[Service]\n"
            f"ExecStart={shlex.join(argv)}\n"
            "Restart=always\nRestartSec=1\nKillMode=mixed\n\n"
            "[Install]\nWantedBy=multi-user.target\n")


def unit_name(daemon: Daemon) -> str:
    return f"{UNIT_PREFIX}{daemon.name}.service"


# ================================================================ shell: supervisors

def say(msg: str) -> None:
    print(msg, flush=True)


def http_ok(url: str, netns_name: str | None = None) -> bool:
    """GET url -> 200? From inside `netns_name` when given (its loopback is not ours)."""
    if netns_name:
        argv = netns.enter(netns_name, ["curl", "-sf", "-o", "/dev/null", "--max-time", "1", url])
        return subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def wait_ready(daemon: Daemon, netns_name: str | None, timeout: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout
    while not http_ok(daemon.ready_url, netns_name):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{daemon.name} did not answer {daemon.ready_url} within {timeout:.0f}s; "
                               f"log: {log_path}")
        time.sleep(0.05)


class ProcessSupervisor:
    """Detached processes (own session), logging to files; pids recorded for `down`/`reset`."""

    def __init__(self, log_dir: str, pid_file: str, netns_name: str | None, env: dict | None = None):
        self.log_dir, self.pid_file, self.netns = Path(log_dir), Path(pid_file), netns_name
        self.env = env

    def log_path(self, daemon: Daemon) -> str:
        return str(self.log_dir / f"{daemon.name}.log")

    def start(self, daemon: Daemon) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        argv = netns.enter(self.netns, daemon.argv) if self.netns else list(daemon.argv)
        with open(self.log_path(daemon), "ab") as log_file:
            proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, close_fds=True, env=self.env)
        with open(self.pid_file, "a") as f:
            f.write(f"{proc.pid} {daemon.name}\n")
        return proc.pid


class SystemdSupervisor:
    """A unit per daemon under /etc/systemd/system, enabled and started (what the Vagrant VMs use)."""

    def __init__(self, unit_dir: Path = SYSTEMD_DIR, netns_name: str | None = None):
        self.unit_dir, self.netns = unit_dir, netns_name

    def log_path(self, daemon: Daemon) -> str:
        return f"journalctl -u {unit_name(daemon)}"

    def start(self, daemon: Daemon) -> int:
        path = self.unit_dir / unit_name(daemon)
        path.write_text(systemd_unit(daemon, self.netns))
        netns.run(["systemctl", "daemon-reload"])
        netns.run(["systemctl", "enable", "--now", unit_name(daemon)])
        return 0


async def apply_objects(server: str, objects: list[dict]) -> None:
    """Create each object unless it exists (the system manifest on a control plane, again on a re-join)."""
    from netplane.client import APIError, Client
    async with Client(server) as client:
        for obj in objects:
            try:
                await client.create(obj)
            except APIError as err:
                if err.status != 409:
                    raise


def apply_system_manifest(config: JoinConfig) -> None:
    import asyncio

    from netplane.objects import load_file
    objects = with_dns_upstream(load_file(config.system_manifest), config.dns_upstream)
    asyncio.run(apply_objects(config.api_server, objects))


def with_dns_upstream(objects: list[dict], upstream: str) -> list[dict]:
    """The system objects with kube-dns forwarding outside names to `upstream` (ADDR[:PORT] or a
    resolv.conf path), set up as CoreDNS is (`forward . /etc/resolv.conf`): the DNS pod takes
    dnsPolicy Default, so /etc/resolv.conf in it is the node's, not the cluster's own."""
    if not upstream:
        return objects
    out = copy.deepcopy(objects)
    for obj in out:
        template = (obj.get("spec") or {}).get("template") or {}
        if obj.get("kind") == "Deployment" and ((template.get("metadata") or {}).get("labels") or {}).get(
                "k8s-app") == "kube-dns":
            spec = template["spec"]
            spec["dnsPolicy"] = "Default"
            for container in spec["containers"]:
                container["args"] = [*container.get("args", []), "--upstream", upstream]
    return out


def install_cni(directory: str) -> str:
    from netplane.cni.install import install
    return install(directory)


def join(config: JoinConfig, supervisor=None, timeout: float = 30, progress=say) -> list[Daemon]:
    """Bootstrap this node: the CNI launcher, then every daemon of its role, in order."""
    validate(config)
    supervisor = supervisor or make_supervisor(config)
    install_cni(config.cni_bin)
    os.makedirs(config.node_state_dir, exist_ok=True)
    if config.etcd_data_dir:
        os.makedirs(config.etcd_data_dir, mode=0o700, exist_ok=True)
    daemons = plan(config)
    for daemon in daemons:
        supervisor.start(daemon)
        if daemon.ready_url:
            wait_ready(daemon, config.netns, timeout, supervisor.log_path(daemon))
        if daemon.name == "apiserver" and config.system_manifest:
            apply_system_manifest(config)  # kube-dns and the ingress, before anything watches
    progress(f"node {config.node_name} ({config.node_ip}) joined {config.api_server}: "
             + ", ".join(d.name for d in daemons))
    return daemons


def make_supervisor(config: JoinConfig):
    if config.supervisor == "systemd":
        return SystemdSupervisor(netns_name=config.netns)
    return ProcessSupervisor(config.logs, os.path.join(config.state_dir, "pids"), config.netns)


# ================================================================ reset: undo a join on this machine

def reset(state_dir: str, supervisor: str) -> int:
    """Stop our daemons and remove what they made in this network namespace (pods, rules, links)."""
    if supervisor == "systemd":
        for unit in sorted(SYSTEMD_DIR.glob(f"{UNIT_PREFIX}*.service")):
            netns.run(["systemctl", "disable", "--now", unit.name], check=False)
            unit.unlink()
        netns.run(["systemctl", "daemon-reload"], check=False)
    else:
        for pid in _recorded_pids(Path(state_dir) / "pids"):
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    for name in pod_namespaces(Path(state_dir)):
        netns.delete(name)
    netns.run([sys.executable, "-m", "netplane", "proxy", "sync", "--cleanup"], check=False)
    for link in ("np-vxlan", "cni0"):
        netns.run(["ip", "link", "delete", link], check=False)
    netns.run(["ip", "route", "flush", "proto", "78"], check=False)
    say(f"node reset: daemons stopped, pod namespaces, proxy rules, cni0 and np-vxlan removed "
        f"(state in {state_dir} kept)")
    return 0


def pod_namespaces(state_dir: Path) -> list[str]:
    """The pod namespaces of the nodes joined with this state dir (the agent's pods/NS_NAME_UID dirs):
    only ours, never another node's (a lab on the same machine keeps its pods)."""
    from netplane.podnet import netns_name
    return sorted(netns_name(pod_dir.name.rsplit("_", 1)[1])
                  for pod_dir in state_dir.glob("nodes/*/pods/*_*_*") if pod_dir.is_dir())


def _recorded_pids(path: Path) -> list[int]:
    try:
        return [int(line.split()[0]) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


# ================================================================ CLI

def parse_join(argv: list[str]) -> tuple[JoinConfig, bool]:
    p = argparse.ArgumentParser(prog="netplane node join", description="make this machine a node of a cluster")
    p.add_argument("--server", default="", help="the API server URL (a worker; default for --control-plane: "
                                                "http://NODE_IP:6443)")
    p.add_argument("--node-name", required=True)
    p.add_argument("--node-ip", required=True, help="this node's address on the node network")
    p.add_argument("--control-plane", action="store_true",
                   help="also run the API server, controller manager, scheduler and LoadBalancer controller")
    p.add_argument("--pod-network", choices=POD_NETWORKS, default="routes",
                   help="routes: pod CIDRs routed via node addresses (host-gw); vxlan: an overlay")
    p.add_argument("--proxy", choices=PROXY_BACKENDS, default="nftables", help="the service proxy's backend")
    p.add_argument("--store", choices=STORES, default="sqlite", help="the API server's store (--control-plane)")
    p.add_argument("--etcd-endpoints", default="", help=f"etcd client URLs (default {ETCD_CLIENT_URL})")
    p.add_argument("--etcd-data-dir", default="", help="run etcd here ourselves (else use a running etcd)")
    p.add_argument("--lb-pool", action="append", default=[], metavar="RANGE",
                   help="LoadBalancer address pool (A-B or CIDR; repeat); default 192.168.56.200-192.168.56.250")
    p.add_argument("--cluster-cidr", default=CLUSTER_CIDR)
    p.add_argument("--service-cidr", default=SERVICE_CIDR)
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    p.add_argument("--cni-bin-dir", default="", help="where the netplane-cni launcher goes (default STATE/cni-bin)")
    p.add_argument("--log-dir", default="", help="daemon logs with --supervisor process (default STATE/logs)")
    p.add_argument("--netns", default=None, help="run the daemons in this named network namespace (the lab)")
    p.add_argument("--supervisor", choices=("process", "systemd"), default="process")
    p.add_argument("--system-manifest", default=JoinConfig.system_manifest,
                   help="objects the control plane creates once its API server answers ('' for none)")
    p.add_argument("--dns-upstream", default="", metavar="ADDR[:PORT]|FILE",
                   help="kube-dns forwards outside names here, e.g. /etc/resolv.conf (default: it refuses them)")
    p.add_argument("--dry-run", action="store_true", help="print the daemons and their command lines; start nothing")
    args = p.parse_args(argv)
    config = JoinConfig(
        node_name=args.node_name, node_ip=args.node_ip, server=args.server, control_plane=args.control_plane,
        pod_network=args.pod_network, proxy=args.proxy, store=args.store, etcd_endpoints=args.etcd_endpoints,
        etcd_data_dir=os.path.abspath(args.etcd_data_dir) if args.etcd_data_dir else "",
        lb_pool=tuple(args.lb_pool), cluster_cidr=args.cluster_cidr, service_cidr=args.service_cidr,
        state_dir=os.path.abspath(args.state_dir), cni_bin_dir=args.cni_bin_dir, log_dir=args.log_dir,
        netns=args.netns, supervisor=args.supervisor, system_manifest=args.system_manifest,
        dns_upstream=args.dns_upstream)
    try:
        validate(config)
    except ValueError as err:
        p.error(str(err))
    return config, args.dry_run


def main(argv: list[str]) -> int:
    if argv and argv[0] == "join":
        config, dry_run = parse_join(argv[1:])
        if dry_run:
            for daemon in plan(config):
                print(f"{daemon.name}: {shlex.join(daemon.argv)}")
            return 0
        try:
            join(config)
        except (OSError, TimeoutError, netns.CommandError) as err:
            print(f"netplane node join: {err}", file=sys.stderr)
            return 1
        return 0
    if argv and argv[0] == "reset":
        p = argparse.ArgumentParser(prog="netplane node reset")
        p.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
        p.add_argument("--supervisor", choices=("process", "systemd"), default="process")
        args = p.parse_args(argv[1:])
        return reset(args.state_dir, args.supervisor)
    print("usage: netplane node join|reset [--help]")
    return 0 if argv and argv[0] in ("-h", "--help") else 2
