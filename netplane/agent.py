"""The node agent (our kubelet): registers its Node, wires the node's pod network, runs the pods
bound to it as processes in their own network namespaces, and reports their status.

    netplane agent --server URL --node-name NAME --node-ip IP --state-dir DIR [...]

It runs inside the node's network namespace. Pure core first (flags, the Node object, the route
set, pod status); then the shell: a PodWorker per pod (sandbox via CNI, container processes,
probes, restarts, status reports) and the Agent that registers, heartbeats, keeps routes to the
other nodes' pod CIDRs, and starts/stops workers as the watched pod set changes.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from netplane import daemon, netns, overlay, podexec, podlogs, podmetrics, podnet, portforward, runtime
from netplane.daemon import log_fields
from netplane.events import EventRecorder
from netplane.podnet import PodRef

log = logging.getLogger("agent")

AGENT_VERSION = "netplane-agent/0.1.0"
HEARTBEAT_SECONDS = 5.0
STOP_GRACE_SECONDS = 5.0
ROUTE_PROTO = "78"  # marks our routes to other nodes' pod CIDRs (`ip route show proto 78`)
ROUTE_VERIFY_SECONDS = 30.0
KUBERNETES_SERVICE = ("10.96.0.1", "443")


def pod_netns_name(pod: dict) -> str:
    """The network namespace the agent gives this Pod (for `netplane lab exec POD`)."""
    return PodRef.from_pod(pod).netns


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ================================================================ pure core: flags

class FlagError(ValueError):
    pass


def parse_node_labels(text: str) -> dict[str, str]:
    """'a=b,c=d' -> {'a': 'b', 'c': 'd'} (--node-labels)."""
    labels = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FlagError(f"--node-labels: {item!r} is not key=value")
        labels[key] = value
    return labels


TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def parse_taints(text: str) -> list[dict]:
    """'key=value:NoSchedule,key2:NoExecute' -> Taint objects (--register-with-taints)."""
    taints = []
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key_value, sep, effect = item.rpartition(":")
        if not sep or effect not in TAINT_EFFECTS:
            raise FlagError(f"--register-with-taints: {item!r} needs key[=value]:EFFECT with EFFECT one of "
                            f"{', '.join(TAINT_EFFECTS)}")
        key, _, value = key_value.partition("=")
        if not key:
            raise FlagError(f"--register-with-taints: {item!r} has no key")
        taint = {"key": key, "effect": effect}
        if value:
            taint["value"] = value
        taints.append(taint)
    return taints


@dataclass(frozen=True)
class AgentConfig:
    server: str
    node_name: str
    node_ip: str
    state_dir: str
    cni_bin_dir: str
    cluster_dns: str = "10.96.0.10"
    cluster_domain: str = "cluster.local"
    node_labels: dict = field(default_factory=dict)
    taints: tuple = ()
    health_listen: str | None = None
    pod_network: str = "routes"  # routes (pod CIDRs via node addresses) | vxlan (netplane.overlay)

    @property
    def cni_config_path(self) -> str:
        return os.path.join(self.state_dir, "cni", "10-netplane.conf")

    @property
    def pods_dir(self) -> Path:
        return Path(self.state_dir) / "pods"


def parse_args(argv: list[str]) -> AgentConfig:
    parser = argparse.ArgumentParser(prog="netplane agent", description="the node agent: pods on this node")
    parser.add_argument("--server", required=True, help="API server URL, e.g. http://192.168.56.10:6443")
    parser.add_argument("--node-name", required=True)
    parser.add_argument("--node-ip", required=True, help="this node's InternalIP")
    parser.add_argument("--state-dir", required=True, help="CNI config, IPAM state, pod logs")
    parser.add_argument("--cni-bin-dir", default=os.path.dirname(sys.executable),
                        help="where netplane-cni is (default: next to this Python)")
    parser.add_argument("--cluster-dns", default="10.96.0.10")
    parser.add_argument("--cluster-domain", default="cluster.local")
    parser.add_argument("--node-labels", default="", help="k=v,... added to the Node's labels")
    parser.add_argument("--register-with-taints", default="", help="key=value:NoSchedule,...")
    parser.add_argument("--health-listen", default=None, help="ADDR:PORT for /healthz and /metrics")
    parser.add_argument("--pod-network", choices=("routes", "vxlan"), default="routes",
                        help="routes: other nodes' pod CIDRs via their addresses; vxlan: an overlay")
    args = parser.parse_args(argv)
    try:
        ipaddress.ip_address(args.node_ip)
        ipaddress.ip_address(args.cluster_dns)
        labels = parse_node_labels(args.node_labels)
        taints = tuple(parse_taints(args.register_with_taints))
        if args.health_listen:
            daemon.split_hostport(args.health_listen)
    except ValueError as err:
        parser.error(str(err))
    return AgentConfig(server=args.server, node_name=args.node_name, node_ip=args.node_ip,
                       state_dir=os.path.abspath(args.state_dir), cni_bin_dir=args.cni_bin_dir,
                       cluster_dns=args.cluster_dns, cluster_domain=args.cluster_domain,
                       node_labels=labels, taints=taints, health_listen=args.health_listen,
                       pod_network=args.pod_network)


# ================================================================ pure core: the Node

def node_manifest(config: AgentConfig) -> dict:
    labels = {"kubernetes.io/hostname": config.node_name, "kubernetes.io/os": "linux", **config.node_labels}
    metadata = {"name": config.node_name, "labels": labels}
    if config.pod_network == "vxlan":  # other nodes find this node's VTEP here
        metadata["annotations"] = overlay.node_annotations(config.node_ip)
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": metadata,
            "spec": {"taints": list(config.taints)} if config.taints else {}}


def node_status(config: AgentConfig, facts: dict, heartbeat: str, ready_since: str) -> dict:
    status = _node_status(config, facts, heartbeat, ready_since)
    if config.health_listen:   # where the API server asks for pod logs (podlogs.py), as the kubelet's port
        status["daemonEndpoints"] = {"kubeletEndpoint": {"Port": daemon.split_hostport(config.health_listen)[1]}}
    return status


def _node_status(config: AgentConfig, facts: dict, heartbeat: str, ready_since: str) -> dict:
    ready = {"type": "Ready", "status": "True", "reason": "KubeletReady",
             "message": "netplane agent is posting ready status",
             "lastHeartbeatTime": heartbeat, "lastTransitionTime": ready_since}
    resources = {"cpu": str(facts.get("cpus", 1)), "memory": f"{facts.get('memory_ki', 0)}Ki", "pods": "110"}
    return {
        "addresses": [{"type": "InternalIP", "address": config.node_ip},
                      {"type": "Hostname", "address": config.node_name}],
        "conditions": [ready],
        "capacity": resources, "allocatable": resources,
        "nodeInfo": {"kubeletVersion": AGENT_VERSION, "kubeProxyVersion": "",
                     "containerRuntimeVersion": "netplane://0.1.0 (processes in network namespaces)",
                     "operatingSystem": "linux", "architecture": facts.get("architecture", ""),
                     "kernelVersion": facts.get("kernel", ""), "osImage": facts.get("os_image", ""),
                     "machineID": facts.get("machine_id", ""), "systemUUID": "", "bootID": ""},
    }


def host_facts() -> dict:
    """What nodeInfo reports about this machine (read once at start)."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    facts = {"architecture": arch, "kernel": platform.release(), "cpus": os.cpu_count() or 1}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                facts["os_image"] = line.split("=", 1)[1].strip('"')
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                facts["memory_ki"] = int(line.split()[1])
        facts["machine_id"] = Path("/etc/machine-id").read_text().strip()
    except (OSError, ValueError, IndexError):
        pass
    return facts


def internal_ip(node: dict) -> str:
    for address in (node.get("status") or {}).get("addresses") or []:
        if address.get("type") == "InternalIP":
            return address.get("address", "")
    return ""


# ================================================================ pure core: routes to other nodes

def desired_routes(nodes: list[dict], me: str) -> dict[str, str]:
    """{other node's podCIDR: its InternalIP} (routed pod network, like flannel host-gw)."""
    own_cidr = next(((n.get("spec") or {}).get("podCIDR") for n in nodes
                     if (n.get("metadata") or {}).get("name") == me), None)
    routes = {}
    for node in nodes:
        if (node.get("metadata") or {}).get("name") == me:
            continue
        cidr, via = (node.get("spec") or {}).get("podCIDR"), internal_ip(node)
        try:
            cidr = str(ipaddress.ip_network(cidr)) if cidr else None
            via = str(ipaddress.ip_address(via)) if via else None
        except ValueError:
            continue  # a malformed object must not break the routes of the others
        if cidr and via and cidr != own_cidr:
            routes[cidr] = via
    return routes


def route_commands(desired: dict[str, str], actual: dict[str, str]) -> list[list[str]]:
    """The `ip route` commands that turn our marked routes `actual` into `desired`."""
    commands = [["ip", "route", "replace", cidr, "via", via, "proto", ROUTE_PROTO]
                for cidr, via in sorted(desired.items()) if actual.get(cidr) != via]
    commands += [["ip", "route", "del", cidr, "proto", ROUTE_PROTO]
                 for cidr in sorted(set(actual) - set(desired))]
    return commands


def parse_route_listing(text: str) -> dict[str, str]:
    """`ip -j route show proto 78` -> {dst: gateway}."""
    routes = {}
    for entry in json.loads(text or "[]"):
        if entry.get("dst") and entry.get("gateway"):
            dst = entry["dst"] if "/" in entry["dst"] else entry["dst"] + "/32"
            routes[dst] = entry["gateway"]
    return routes


# ================================================================ pure core: pod status

@dataclass
class ContainerRecord:
    """What the agent knows about one container; turned into a containerStatus."""
    name: str
    image: str
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    started_at: str = ""
    finished_at: str = ""
    exit_code: int = 0
    restart_count: int = 0
    ready: bool = False
    last_terminated: dict | None = None

    def set_waiting(self, reason: str, message: str = "") -> None:
        self.state, self.reason, self.message, self.ready = "waiting", reason, message, False

    def set_running(self, at: str) -> None:
        self.state, self.reason, self.message, self.started_at = "running", "", "", at

    def set_terminated(self, exit_code: int, at: str) -> None:
        self.state, self.exit_code, self.finished_at, self.ready = "terminated", exit_code, at, False
        self.reason, self.message = ("Completed" if exit_code == 0 else "Error"), ""
        self.last_terminated = self._terminated()

    def _terminated(self) -> dict:
        return {"exitCode": self.exit_code, "reason": self.reason,
                "startedAt": self.started_at or None, "finishedAt": self.finished_at}

    def status(self) -> dict:
        if self.state == "running":
            state = {"running": {"startedAt": self.started_at}}
        elif self.state == "terminated":
            state = {"terminated": self._terminated()}
        else:
            state = {"waiting": {"reason": self.reason, **({"message": self.message} if self.message else {})}}
        last = {"terminated": self.last_terminated} if self.last_terminated and self.state != "terminated" else {}
        return {"name": self.name, "image": self.image, "imageID": "", "containerID": "",
                "ready": self.ready, "started": self.state == "running", "restartCount": self.restart_count,
                "state": state, "lastState": last}

    @property
    def has_run(self) -> bool:
        return self.last_terminated is not None or self.state != "waiting"


def container_record(worker, name: str) -> ContainerRecord | None:
    """A pod's container by name: one of its spec's, or an ephemeral one (kubectl debug's)."""
    return next((c for c in [*worker.containers, *worker.ephemeral.values()] if c.name == name), None)


def pod_phase(sandbox_ready: bool, containers: list[ContainerRecord]) -> str:
    """Kubernetes' phase rule, for containers that are processes."""
    if not sandbox_ready or not containers:
        return "Pending"
    if any(c.state == "waiting" and not c.has_run for c in containers):
        return "Pending"
    if any(c.state == "running" for c in containers):
        return "Running"
    if any(c.state == "waiting" for c in containers):
        return "Running"  # stopped, waiting to restart (CrashLoopBackOff)
    return "Succeeded" if all(c.exit_code == 0 for c in containers) else "Failed"


def next_conditions(previous: dict[str, tuple[str, str]], wanted: dict[str, bool],
                    now: str) -> dict[str, tuple[str, str]]:
    """{type: (status, lastTransitionTime)}, keeping the old time when the status did not change."""
    conditions = {}
    for type_, ok in wanted.items():
        status = "True" if ok else "False"
        prev = previous.get(type_)
        conditions[type_] = prev if prev and prev[0] == status else (status, now)
    return conditions


@dataclass
class SandboxState:
    ready: bool = False
    pod_ip: str = ""
    reason: str = ""
    message: str = ""


def pod_status(sandbox: SandboxState, containers: list[ContainerRecord], host_ip: str,
               start_time: str, conditions: dict[str, tuple[str, str]],
               ephemeral: list[ContainerRecord] = ()) -> dict:
    status = {
        "phase": pod_phase(sandbox.ready, containers),
        "conditions": [{"type": t, "status": s, "lastProbeTime": None, "lastTransitionTime": at}
                       for t, (s, at) in conditions.items()],
        "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
        "startTime": start_time,
        "containerStatuses": [c.status() for c in containers],
        "qosClass": "BestEffort",
    }
    if ephemeral:   # kubectl debug's: they count for neither the phase nor readiness
        status["ephemeralContainerStatuses"] = [c.status() for c in ephemeral]
    if sandbox.pod_ip:
        status["podIP"], status["podIPs"] = sandbox.pod_ip, [{"ip": sandbox.pod_ip}]
    if sandbox.message:
        status["reason"], status["message"] = sandbox.reason, sandbox.message
    else:
        problems = [f"container {c.name}: {c.message}" for c in containers if c.state == "waiting" and c.message]
        if problems:
            status["message"] = "; ".join(problems)
    return status


def wanted_conditions(sandbox: SandboxState, containers: list[ContainerRecord]) -> dict[str, bool]:
    all_ready = sandbox.ready and bool(containers) and all(c.ready for c in containers)
    return {"PodReadyToStartContainers": sandbox.ready, "PodScheduled": True, "Initialized": True,
            "ContainersReady": all_ready, "Ready": all_ready}


def status_patch(old: dict | None, new: dict) -> dict:
    """A merge patch from `old` to `new` (top level): keys gone from `new` become null."""
    patch = {k: v for k, v in new.items() if (old or {}).get(k) != v}
    patch.update({k: None for k in (old or {}) if k not in new})
    return patch


# ================================================================ shell: one pod

class PodWorker:
    """Everything for one pod: sandbox, containers, probes, restarts, status reports."""

    def __init__(self, agent: "Agent", pod: dict):
        self.agent = agent
        self.pod = pod
        self.ref = PodRef.from_pod(pod)
        self.dir = agent.config.pods_dir / self.ref.dir_name
        spec = pod.get("spec") or {}
        self.specs = [c for c in spec.get("containers") or [] if isinstance(c, dict)]
        self.restart_policy = spec.get("restartPolicy") or "Always"
        self.containers = [ContainerRecord(c.get("name") or f"c{i}", c.get("image") or "")
                           for i, c in enumerate(self.specs)]
        self.sandbox = SandboxState(reason="ContainerCreating")
        self.start_time = now_rfc3339()
        self.conditions: dict[str, tuple[str, str]] = {}
        self.processes: dict[str, runtime.ContainerProcess] = {}
        self.terminals: dict[str, podexec.Terminal] = {}   # containers with stdin and tty
        self.ephemeral: dict[str, ContainerRecord] = {}    # kubectl debug's containers, run once each
        self._ephemeral_tasks: list[asyncio.Task] = []
        self.changed = asyncio.Event()
        self.last_status: dict | None = None
        self.task: asyncio.Task | None = None
        self._sandbox_job: asyncio.Future | None = None

    @property
    def label(self) -> str:
        return f"{self.ref.namespace}/{self.ref.name}"

    def event(self, type_: str, reason: str, message: str) -> None:
        """An Event about this pod, as the kubelet records them (netplane.events)."""
        self.agent.events.emit(self.pod, type_, reason, message)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"pod-{self.label}")
        self.sync_ephemeral()

    def sync_ephemeral(self) -> None:
        """Start each ephemeral container the pod's spec has gained (kubectl debug adds them to a
        running pod through pods/ephemeralcontainers): once, in the pod's namespace, never restarted."""
        for spec in (self.pod.get("spec") or {}).get("ephemeralContainers") or []:
            name = spec.get("name") if isinstance(spec, dict) else None
            if name and name not in self.ephemeral:
                record = self.ephemeral[name] = ContainerRecord(name, spec.get("image") or "")
                self._ephemeral_tasks.append(asyncio.create_task(self._run_ephemeral(spec, record)))
                self.mark_changed()

    async def _run_ephemeral(self, spec: dict, record: ContainerRecord) -> None:
        while not self.sandbox.ready:   # added to a pod still starting: wait for its network
            await asyncio.sleep(0.1)
        plan = self._plan(spec, record)
        if plan is None:
            return
        try:
            await self._run_once(record, *plan, terminal=bool(spec.get("stdin") and spec.get("tty")))
        except OSError as err:
            record.set_waiting("RunContainerError", f"cannot start: {err}")
            self.mark_changed()

    def mark_changed(self) -> None:
        self.changed.set()

    async def _run(self) -> None:
        reporter = asyncio.create_task(self._report_loop())
        supervisors: list[asyncio.Task] = []
        try:
            self.mark_changed()
            await self._setup_sandbox()
            supervisors = [asyncio.create_task(self._supervise(i)) for i in range(len(self.specs))]
            for record, outcome in zip(self.containers, await asyncio.gather(*supervisors, return_exceptions=True)):
                if isinstance(outcome, Exception):  # a bug in one container's supervision: keep the rest
                    log_fields(log, logging.ERROR, "container supervisor failed", pod=self.label,
                               container=record.name, error=repr(outcome))
            await asyncio.Future()  # all containers done for good: keep reporting until stopped
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in one pod must not take the agent down
            log.exception("pod worker %s failed", self.label)
        finally:
            for task in supervisors:
                task.cancel()
            await asyncio.sleep(0)  # let supervisors leave their awaits
            reporter.cancel()

    async def stop(self, teardown: bool) -> None:
        """Stop supervising. With teardown (pod deleted): stop processes, CNI DEL, remove the netns."""
        for task in [self.task, *self._ephemeral_tasks]:
            if task:
                task.cancel()
        await asyncio.gather(*(t for t in [self.task, *self._ephemeral_tasks] if t), return_exceptions=True)
        if not teardown:
            return  # agent shutdown: the pod keeps running, as containers outlive a kubelet
        if self._sandbox_job is not None:
            await asyncio.gather(self._sandbox_job, return_exceptions=True)
        await asyncio.gather(*(p.stop(STOP_GRACE_SECONDS) for p in self.processes.values()),
                             return_exceptions=True)
        await asyncio.to_thread(teardown_sandbox, self.agent.config, self.ref, self.dir, self.agent.cni_config)
        log_fields(log, logging.INFO, "pod removed", pod=self.label, netns=self.ref.netns)

    # -- sandbox

    async def _setup_sandbox(self) -> None:
        if not self.agent.network_ready.is_set():
            self.sandbox.reason, self.sandbox.message = "NetworkNotReady", "waiting for the node's spec.podCIDR"
            self.mark_changed()
            await self.agent.network_ready.wait()
        attempt = 0
        while True:
            loop = asyncio.get_running_loop()
            self._sandbox_job = loop.run_in_executor(None, create_sandbox, self.agent.config, self.agent.cni_config,
                                                     self.ref, self.dir)
            try:
                pod_ip = await asyncio.shield(self._sandbox_job)
                self.sandbox = SandboxState(ready=True, pod_ip=pod_ip)
                self.mark_changed()
                log_fields(log, logging.INFO, "pod sandbox ready", pod=self.label, ip=pod_ip, netns=self.ref.netns)
                self.event("Normal", "SandboxReady", f"Pod network ready: {pod_ip} in {self.ref.netns}")
                return
            except Exception as err:
                attempt += 1
                delay = runtime.backoff_delay(attempt)
                self.sandbox = SandboxState(reason="FailedCreatePodSandBox",
                                            message=f"{err} (attempt {attempt}, retrying in {delay:.0f}s)")
                self.mark_changed()
                log_fields(log, logging.WARNING, "pod sandbox failed", pod=self.label, error=str(err))
                self.event("Warning", "FailedCreatePodSandBox", f"Failed to create pod sandbox: {err}")
                await asyncio.to_thread(undo_failed_add, self.agent.config, self.agent.cni_config, self.ref)
                await asyncio.sleep(delay)

    # -- containers

    def _facts(self) -> runtime.PodFacts:
        return runtime.PodFacts(pod_name=self.ref.name, namespace=self.ref.namespace, pod_ip=self.sandbox.pod_ip,
                                node_name=self.agent.config.node_name, host_ip=self.agent.config.node_ip,
                                server=self.agent.config.server,
                                service_account=(self.pod.get("spec") or {}).get("serviceAccountName") or "default")

    def _plan(self, spec: dict, record: ContainerRecord) -> tuple[list[str], dict, "Probes"] | None:
        """What to run for a container (argv, env, probes); None, reported, when it cannot run."""
        base = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "HOME": "/root",
                "HOSTNAME": self.ref.hostname}
        env = runtime.container_env(spec, self._facts(), self.pod, base)
        try:
            probes = Probes(runtime.readiness_probe(spec), runtime.liveness_probe(spec))
            return runtime.container_argv(spec, env), env, probes
        except runtime.ImageNotRunnable as err:
            record.set_waiting("ErrImagePull", str(err))
        except runtime.ProbeSpecError as err:
            record.set_waiting("CreateContainerConfigError", str(err))
        self.mark_changed()
        self.event("Warning", "Failed", f"Error: {record.reason}: {record.message}")
        return None

    async def _supervise(self, index: int) -> None:
        """Run one container until restartPolicy says it is done, backing off between crashes."""
        record = self.containers[index]
        plan = self._plan(self.specs[index], record)
        if plan is None:
            return
        failures = 0
        while True:
            started = time.monotonic()
            try:
                spec = self.specs[index]
                exit_code = await self._run_once(record, *plan, terminal=bool(spec.get("stdin") and spec.get("tty")))
            except OSError as err:
                record.set_waiting("RunContainerError", f"cannot start: {err}")
                self.mark_changed()
                self.event("Warning", "Failed", f"Error: cannot start container {record.name}: {err}")
                return
            if not runtime.should_restart(self.restart_policy, exit_code):
                return
            failures = 1 if time.monotonic() - started > runtime.BACKOFF_RESET_AFTER else failures + 1
            delay = runtime.backoff_delay(failures)
            record.set_waiting("CrashLoopBackOff",
                               f"back-off {delay:.0f}s restarting failed container={record.name} pod={self.ref.name}")
            self.mark_changed()
            self.event("Warning", "BackOff", f"Back-off restarting failed container {record.name} in pod "
                                             f"{self.ref.name} (exit code {exit_code})")
            await asyncio.sleep(delay)
            record.restart_count += 1
            RESTARTS.inc()

    async def _run_once(self, record: ContainerRecord, argv: list[str], env: dict, probes: "Probes",
                        terminal: bool = False) -> int:
        """Start the container's process, probe it while it runs; its exit code. With `terminal` (stdin
        and tty in its spec) it runs on a pseudo-terminal that `kubectl attach` reaches."""
        log_path = str(self.dir / f"{record.name}.log")
        if record.has_run:   # a restart: the run before is what `kubectl logs --previous` shows
            podlogs.start_new_run(log_path)
        process = await runtime.start_process(runtime.process_argv(self.ref.netns, self.ref.hostname, argv),
                                              env, log_path, terminal=terminal)
        self.processes[record.name] = process
        if process.terminal is not None:
            old = self.terminals.pop(record.name, None)
            if old is not None:
                old.close()
            self.terminals[record.name] = podexec.Terminal(process.terminal, log_path)
        record.set_running(now_rfc3339())
        record.ready = probes.readiness is None
        self.mark_changed()
        log_fields(log, logging.INFO, "container started", pod=self.label, container=record.name,
                   pid=process.pid, argv=argv)
        self.event("Normal", "Started", f"Started container {record.name}")
        probers = []
        if probes.readiness:
            probers.append(asyncio.create_task(self._readiness_loop(record, probes.readiness)))
        if probes.liveness:
            probers.append(asyncio.create_task(self._liveness_loop(record, probes.liveness, process)))
        try:
            exit_code = await process.wait()
        finally:
            for prober in probers:
                prober.cancel()
        self.processes.pop(record.name, None)
        record.set_terminated(exit_code, now_rfc3339())
        self.mark_changed()
        log_fields(log, logging.INFO, "container exited", pod=self.label, container=record.name, exit_code=exit_code)
        return exit_code

    async def _readiness_loop(self, record: ContainerRecord, probe: runtime.Probe) -> None:
        tracker = runtime.ProbeTracker(probe)
        await asyncio.sleep(probe.initial_delay)
        while True:
            ok = await runtime.run_probe(probe, self.sandbox.pod_ip, self.ref.netns)
            if tracker.record(ok):
                record.ready = tracker.ready
                self.mark_changed()
                log_fields(log, logging.INFO, "readiness changed", pod=self.label, container=record.name,
                           ready=tracker.ready)
                if not tracker.ready:
                    self.event("Warning", "Unhealthy", f"Readiness probe failed for container {record.name}")
            await asyncio.sleep(tracker.next_delay())

    async def _liveness_loop(self, record: ContainerRecord, probe: runtime.Probe,
                             process: runtime.ContainerProcess) -> None:
        """Stop the container once its liveness check fails failureThreshold times; the supervisor
        then restarts it per restartPolicy, as the kubelet does."""
        tracker = runtime.ProbeTracker(probe, ready=True)
        await asyncio.sleep(probe.initial_delay)
        while True:
            tracker.record(await runtime.run_probe(probe, self.sandbox.pod_ip, self.ref.netns))
            if not tracker.ready:
                break
            await asyncio.sleep(probe.period)
        log_fields(log, logging.INFO, "liveness check failed; stopping the container", pod=self.label,
                   container=record.name, failures=tracker.failures)
        self.event("Warning", "Unhealthy", f"Liveness probe failed {tracker.failures} times: container "
                                           f"{record.name} will be restarted")
        await process.stop(STOP_GRACE_SECONDS)

    # -- status

    def compute_status(self) -> dict:
        self.conditions = next_conditions(self.conditions, wanted_conditions(self.sandbox, self.containers),
                                          now_rfc3339())
        return pod_status(self.sandbox, self.containers, self.agent.config.node_ip, self.start_time,
                          self.conditions, list(self.ephemeral.values()))

    async def _report_loop(self) -> None:
        from netplane.client import APIError
        while True:
            await self.changed.wait()
            self.changed.clear()
            status = self.compute_status()
            if status == self.last_status:
                continue
            try:
                await self.agent.client.patch("Pod", self.ref.name, {"status": status_patch(self.last_status, status)},
                                              namespace=self.ref.namespace, subresource="status")
                self.last_status = status
            except APIError as err:
                if err.status == 404:
                    return  # deleted: the watch will tell the agent
                log_fields(log, logging.WARNING, "status report failed", pod=self.label, error=str(err))
                self.changed.set()
                await asyncio.sleep(1)
            except Exception as err:  # connection trouble: retry
                log_fields(log, logging.WARNING, "status report failed", pod=self.label, error=str(err))
                self.changed.set()
                await asyncio.sleep(1)
            await asyncio.sleep(0.05)  # coalesce bursts (start + ready) into fewer patches


@dataclass(frozen=True)
class Probes:
    readiness: runtime.Probe | None
    liveness: runtime.Probe | None


# ---------------------------------------------------------------- sandbox steps (blocking; run in threads)

SANDBOX_FILE = "sandbox.json"


def _read_sandbox(pod_dir: Path) -> dict:
    try:
        return json.loads((pod_dir / SANDBOX_FILE).read_text())
    except (OSError, ValueError):
        return {}


def create_sandbox(config: AgentConfig, cni_config: dict, pod: PodRef, pod_dir: Path) -> str:
    """The pod's netns, wired by CNI ADD, with its /etc files; returns the pod IP.

    After an agent restart, a sandbox recorded in pod_dir whose netns still exists is adopted
    (its leftover processes are stopped; the supervisor starts the containers again)."""
    pod_dir.mkdir(parents=True, exist_ok=True)
    saved = _read_sandbox(pod_dir)
    if saved.get("netns") == pod.netns and saved.get("podIP") and netns.exists(pod.netns):
        netns.kill_processes(pod.netns)
        pod_ip = saved["podIP"]
    else:
        started = time.monotonic()
        podnet.create_netns(pod.netns)
        result = podnet.call_plugin("ADD", cni_config, pod, config.cni_bin_dir, f"{netns.NETNS_DIR}/{pod.netns}")
        pod_ip = podnet.pod_ip_from_result(result)
        CNI_ADD_SECONDS.observe(time.monotonic() - started)
        record = {"uid": pod.uid, "namespace": pod.namespace, "name": pod.name, "netns": pod.netns,
                  "podIP": pod_ip, "cniConfig": cni_config, "cniResult": result}
        (pod_dir / SANDBOX_FILE).write_text(json.dumps(record, indent=2) + "\n")
    podnet.write_etc_files(pod.netns, {
        "resolv.conf": podnet.resolv_conf(pod.namespace, config.cluster_dns, config.cluster_domain,
                                          pod.dns, _node_resolv_conf() if pod.dns.policy == "Default" else ""),
        "hosts": podnet.hosts_file(pod, pod_ip, config.cluster_domain),
    })
    return pod_ip


def _node_resolv_conf() -> str:
    """The node's own resolver configuration (for dnsPolicy Default)."""
    try:
        return Path("/etc/resolv.conf").read_text()
    except OSError:
        return ""


def undo_failed_add(config: AgentConfig, cni_config: dict, pod: PodRef) -> None:
    """CNI: an ADD, even a failed one, is followed by a DEL (best effort)."""
    netns_path = f"{netns.NETNS_DIR}/{pod.netns}" if netns.exists(pod.netns) else None
    try:
        podnet.call_plugin("DEL", cni_config, pod, config.cni_bin_dir, netns_path)
    except podnet.CNIError as err:
        log_fields(log, logging.WARNING, "CNI DEL after failed ADD failed", pod=pod.name, error=str(err))


def teardown_sandbox(config: AgentConfig, pod: PodRef, pod_dir: Path, fallback_cni_config: dict | None) -> None:
    """CNI DEL with the config the ADD used (else the node's current one: DEL is idempotent), then
    remove the netns, its /etc files and the pod's state."""
    saved = _read_sandbox(pod_dir)
    cni_config = saved.get("cniConfig") or fallback_cni_config
    if cni_config:
        netns_path = f"{netns.NETNS_DIR}/{pod.netns}" if netns.exists(pod.netns) else None
        try:
            podnet.call_plugin("DEL", cni_config, pod, config.cni_bin_dir, netns_path)
        except podnet.CNIError as err:
            log_fields(log, logging.WARNING, "CNI DEL failed", pod=pod.name, error=str(err))
    podnet.delete_netns(pod.netns)
    podnet.remove_etc_files(pod.netns)
    shutil.rmtree(pod_dir, ignore_errors=True)


def orphaned_sandboxes(pods_dir: Path, live_uids: set[str]) -> list[tuple[PodRef, Path]]:
    """Sandboxes recorded on disk whose pod is no longer bound here (deleted while we were down)."""
    orphans = []
    if not pods_dir.is_dir():
        return orphans
    for pod_dir in sorted(pods_dir.iterdir()):
        saved = _read_sandbox(pod_dir)
        if saved.get("uid") and saved["uid"] not in live_uids:
            ref = PodRef(saved.get("namespace", ""), saved.get("name", ""), saved["uid"], saved.get("name", ""))
            orphans.append((ref, pod_dir))
    return orphans


# ================================================================ shell: the agent

def _metrics():
    from prometheus_client import Counter, Gauge, Histogram
    return (Gauge("netplane_agent_pods", "pods this agent runs"),
            Counter("netplane_agent_container_restarts_total", "container restarts"),
            Histogram("netplane_agent_cni_add_seconds", "netns creation + CNI ADD time",
                      buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)))


PODS, RESTARTS, CNI_ADD_SECONDS = _metrics()


def pod_is_terminal(pod: dict) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


class Agent:
    def __init__(self, config: AgentConfig, client):
        from netplane.client import WatchView
        self.config = config
        self.client = client
        self.view = WatchView(client, ["Node", "Pod"],
                              field_selectors={"Pod": f"spec.nodeName={config.node_name}"})
        self.facts = host_facts()
        self.ready_since = now_rfc3339()
        self.last_heartbeat = 0.0
        self.network_ready = asyncio.Event()
        self.cni_config: dict | None = None
        self.workers: dict[str, PodWorker] = {}
        self.terminating: dict[str, asyncio.Task] = {}
        self.applied_routes: dict[str, str] | overlay.OverlayState | None = None
        self.routes_verified = 0.0
        self.vxlan_checked = ("", 0.0)
        self.known_uids: set[str] | None = None
        self.log_rotations: dict[str, int] = {}   # container log path -> times rotated
        self.sampler = podmetrics.Sampler()       # CPU and memory, for kubectl top
        self.events = EventRecorder(client, "kubelet", config.node_name)

    def _started_container(self, namespace: str, name: str, container: str) -> tuple[PodWorker, ContainerRecord]:
        """A container of a pod on this node that has started at least once; podlogs.LogError."""
        worker = self._worker(namespace, name)
        record = container_record(worker, container)
        if record is None:
            raise podlogs.LogError(400, f'container "{container}" in pod "{name}" is not valid')
        if not record.has_run:
            raise podlogs.LogError(400, f'container "{container}" in pod "{name}" is waiting to start: '
                                        f"{record.reason}")
        return worker, record

    def _worker(self, namespace: str, name: str) -> PodWorker:
        worker = next((w for w in self.workers.values() if (w.ref.namespace, w.ref.name) == (namespace, name)), None)
        if worker is None:
            raise podlogs.LogError(404, f'pods "{name}" not found on node {self.config.node_name}')
        return worker

    def port_forward_target(self, namespace: str, name: str) -> PodWorker:
        """The pod whose ports `kubectl port-forward` reaches: on this node, its network up."""
        worker = self._worker(namespace, name)
        if not worker.sandbox.ready:
            raise podexec.ExecError(400, f'pod "{name}" is not running: its network is not set up')
        return worker

    def log_file(self, namespace: str, name: str, container: str,
                 previous: bool = False) -> tuple[str, ContainerRecord]:
        """The log file of a container of a pod on this node (its run before the current one, with
        `previous`), and its record."""
        worker, record = self._started_container(namespace, name, container)
        path = str(worker.dir / f"{container}.log")
        if previous:
            path = podlogs.previous_path(path)
            if not os.path.exists(path):
                raise podlogs.LogError(400, f'previous terminated container "{container}" in pod "{name}" not found')
        return path, record

    def attach_target(self, namespace: str, name: str, container: str):
        """(worker, its process, its terminal or None) for `kubectl attach` to a running container."""
        worker = self.exec_target(namespace, name, container)
        process = worker.processes.get(container)
        if process is None:
            raise podexec.ExecError(400, f'container "{container}" in pod "{name}" is not running')
        return worker, process, worker.terminals.get(container)

    def exec_target(self, namespace: str, name: str, container: str) -> PodWorker:
        """The pod to run a `kubectl exec` command in: on this node, its container running."""
        worker, record = self._started_container(namespace, name, container)
        if record.state != "running" or not worker.sandbox.ready:
            raise podexec.ExecError(400, f'container "{container}" in pod "{name}" is not running')
        return worker

    def rotate_logs(self) -> None:
        """Bound every container log on this node (podlogs.rotate_if_large); count the rotations."""
        for worker in list(self.workers.values()):
            for record in worker.containers:
                path = str(worker.dir / f"{record.name}.log")
                if podlogs.rotate_if_large(path):
                    self.log_rotations[path] = self.log_rotations.get(path, 0) + 1
                    log_fields(log, logging.INFO, "container log rotated", pod=worker.label, container=record.name)

    def healthy(self) -> tuple[bool, str]:
        age = time.monotonic() - self.last_heartbeat
        if self.last_heartbeat and age < 6 * HEARTBEAT_SECONDS:
            return True, f"ok: {len(self.workers)} pods, heartbeat {age:.0f}s ago"
        return False, "not registered or no heartbeat accepted recently"

    async def run(self, stop: asyncio.Event) -> None:
        from netplane.client import CoalescingRunner
        set_ip_forward()
        if not await self._until_stop(self.register_forever(), stop):
            return
        await self.view.start()
        try:
            if not await self._until_stop(self.view.wait_synced(), stop):
                return
            runner = CoalescingRunner(self.reconcile, min_interval=0.1, periodic=ROUTE_VERIFY_SECONDS)
            self.view.add_listener(runner.request)
            runner.request()
            tasks = [asyncio.create_task(runner.run(stop)), asyncio.create_task(self.heartbeat_loop(stop)),
                     asyncio.create_task(self.metrics_loop())]
            await stop.wait()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await asyncio.gather(*(w.stop(teardown=False) for w in self.workers.values()), return_exceptions=True)
            await asyncio.gather(*self.terminating.values(), return_exceptions=True)
            await self.view.stop()

    async def metrics_loop(self) -> None:
        """Sample the containers' and the machine's CPU and memory for `kubectl top` (netplane.podmetrics)."""
        while True:
            groups = {(uid, name): process.pid for uid, worker in self.workers.items()
                      for name, process in worker.processes.items() if process.popen.returncode is None}
            try:
                await asyncio.to_thread(self.sampler.sample, groups)
            except Exception as err:   # a bug here must not stop the agent: top just shows nothing new
                log_fields(log, logging.WARNING, "resource sampling failed", error=repr(err))
            await asyncio.sleep(podmetrics.SAMPLE_SECONDS)

    def resource_report(self) -> dict:
        """The latest usage: the machine's as this node's, and each running container's by pod."""
        latest = self.sampler.latest
        pods = []
        for uid, worker in self.workers.items():
            containers = [{"name": name, "usage": latest[(uid, name)].as_usage()}
                          for name in worker.processes if (uid, name) in latest]
            pods.append({"namespace": worker.ref.namespace, "name": worker.ref.name, "containers": containers})
        machine = latest.get("machine")
        return {"timestamp": self.sampler.timestamp, "window": self.sampler.window,
                "node": machine.as_usage() if machine else None, "pods": pods}

    @staticmethod
    async def _until_stop(work, stop: asyncio.Event) -> bool:
        """Await `work` unless `stop` comes first; True when the work finished."""
        work_task, stop_task = asyncio.ensure_future(work), asyncio.ensure_future(stop.wait())
        await asyncio.wait([work_task, stop_task], return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        if not work_task.done():
            work_task.cancel()
            await asyncio.gather(work_task, return_exceptions=True)
            return False
        work_task.result()
        return True

    # -- the Node

    async def register_forever(self) -> None:
        while True:
            try:
                await self.register()
                return
            except Exception as err:
                log_fields(log, logging.WARNING, "node registration failed; retrying", error=str(err))
                await asyncio.sleep(1)

    async def register(self) -> None:
        from netplane.client import APIError
        manifest = node_manifest(self.config)
        try:
            await self.client.create(manifest)
            log_fields(log, logging.INFO, "node registered", node=self.config.node_name)
        except APIError as err:
            if err.status != 409:
                raise
            await self.client.patch("Node", self.config.node_name,
                                    {"metadata": {k: v for k, v in manifest["metadata"].items()
                                                  if k in ("labels", "annotations")},
                                     "spec": {"taints": list(self.config.taints) or None}})
            log_fields(log, logging.INFO, "node updated", node=self.config.node_name)
        await self.heartbeat()
        node = await self.client.get("Node", self.config.node_name)
        self.events.emit(node, "Normal", "Starting", f"Starting netplane agent ({AGENT_VERSION}).")
        self.events.emit(node, "Normal", "NodeReady", f"Node {self.config.node_name} status is now: NodeReady")

    async def heartbeat(self) -> None:
        status = node_status(self.config, self.facts, now_rfc3339(), self.ready_since)
        await self.client.patch("Node", self.config.node_name, {"status": status}, subresource="status")
        self.last_heartbeat = time.monotonic()

    async def heartbeat_loop(self, stop: asyncio.Event) -> None:
        from netplane.client import APIError
        while not stop.is_set():
            await asyncio.sleep(HEARTBEAT_SECONDS)
            self.rotate_logs()   # on the loop, not a thread: a log followed meanwhile never sees half of it
            try:
                await self.heartbeat()
            except APIError as err:
                if err.status == 404:  # someone deleted our Node: register again
                    await self.register_forever()
                else:
                    log_fields(log, logging.WARNING, "heartbeat failed", error=str(err))
            except Exception as err:
                log_fields(log, logging.WARNING, "heartbeat failed", error=str(err))

    # -- reconcile: network, routes, pods

    async def reconcile(self) -> None:
        me = self.view.get("Node", "", self.config.node_name)
        if me is not None:
            await self.ensure_network(me)
        await self.sync_routes(self.view.list("Node"))
        await self.sync_pods(self.view.list("Pod"))

    async def ensure_network(self, me: dict) -> None:
        pod_cidr = (me.get("spec") or {}).get("podCIDR")
        if not pod_cidr:
            return
        try:
            config = podnet.network_config(pod_cidr, self.config.state_dir)
        except ValueError as err:
            log_fields(log, logging.ERROR, "bad podCIDR", error=str(err))
            return
        if self.config.pod_network == "vxlan":
            config = {**config, "mtu": overlay.MTU}  # room for the vxlan headers on the underlay
            if not await self.ensure_vxlan_device(pod_cidr):
                return
        if config != self.cni_config:
            await asyncio.to_thread(podnet.write_network_config, self.config.cni_config_path, config)
            self.cni_config = config
            log_fields(log, logging.INFO, "pod network ready", pod_cidr=pod_cidr, config=self.config.cni_config_path)
        self.network_ready.set()

    async def ensure_vxlan_device(self, pod_cidr: str) -> bool:
        """np-vxlan for our pod CIDR (checked when the CIDR changes and at each route verification)."""
        cidr, checked = self.vxlan_checked
        if cidr == pod_cidr and time.monotonic() - checked < ROUTE_VERIFY_SECONDS:
            return True
        try:
            if await asyncio.to_thread(overlay.ensure_device, self.config.node_ip, pod_cidr):
                log_fields(log, logging.INFO, "vxlan device ready", device=overlay.DEVICE,
                           vtep=overlay.vtep_mac(self.config.node_ip))
                self.applied_routes = None  # a new device has no entries yet
        except netns.CommandError as err:
            log_fields(log, logging.ERROR, "vxlan device failed", error=str(err))
            return False
        self.vxlan_checked = (pod_cidr, time.monotonic())
        return True

    async def sync_routes(self, nodes: list[dict]) -> None:
        if self.config.pod_network == "vxlan":
            return await self.sync_overlay(nodes)
        desired = desired_routes(nodes, self.config.node_name)
        if desired == self.applied_routes and time.monotonic() - self.routes_verified < ROUTE_VERIFY_SECONDS:
            return
        listing = await asyncio.to_thread(netns.run, ["ip", "-j", "route", "show", "proto", ROUTE_PROTO])
        commands = route_commands(desired, parse_route_listing(listing.stdout))
        failed = False
        for argv in commands:
            try:
                await asyncio.to_thread(netns.run, argv)
                log_fields(log, logging.INFO, "route changed", command=" ".join(argv))
            except netns.CommandError as err:
                failed = True  # e.g. the other node's address is not reachable yet: retry next sync
                log_fields(log, logging.WARNING, "route change failed", error=str(err))
        self.applied_routes = None if failed else desired
        self.routes_verified = time.monotonic()

    async def sync_overlay(self, nodes: list[dict]) -> None:
        """vxlan: routes, neighbours and fdb entries for the other nodes (netplane.overlay)."""
        if not self.network_ready.is_set():
            return  # the device comes with our pod CIDR
        desired = overlay.desired_state(nodes, self.config.node_name)
        if desired == self.applied_routes and time.monotonic() - self.routes_verified < ROUTE_VERIFY_SECONDS:
            return
        actual = await asyncio.to_thread(overlay.read_actual)
        failed = False
        for argv in overlay.commands(desired, actual):
            try:
                await asyncio.to_thread(netns.run, argv)
                log_fields(log, logging.INFO, "overlay changed", command=" ".join(argv))
            except netns.CommandError as err:
                failed = True
                log_fields(log, logging.WARNING, "overlay change failed", error=str(err))
        self.applied_routes = None if failed else desired
        self.routes_verified = time.monotonic()

    async def sync_pods(self, pods: list[dict]) -> None:
        mine = {}
        for pod in pods:
            if (pod.get("spec") or {}).get("nodeName") != self.config.node_name:
                continue
            if (pod.get("metadata") or {}).get("deletionTimestamp"):
                continue
            mine[PodRef.from_pod(pod).uid] = pod
        for uid in list(self.workers):
            if uid not in mine:
                worker = self.workers.pop(uid)
                self.terminating[uid] = asyncio.create_task(self._terminate(uid, worker))
        for uid, pod in mine.items():
            worker = self.workers.get(uid)
            if worker is not None:
                worker.pod = pod
                worker.sync_ephemeral()
            elif uid not in self.terminating and not pod_is_terminal(pod):
                worker = self.workers[uid] = PodWorker(self, pod)
                worker.start()
                log_fields(log, logging.INFO, "pod added", pod=worker.label, uid=uid)
        PODS.set(len(self.workers))
        # Sandboxes without a worker (pods deleted while we were down, or finished before a restart)
        # are found on disk: at start, and whenever a pod left the set.
        if self.known_uids is None or self.known_uids - set(mine):
            busy = set(mine) | set(self.workers) | set(self.terminating)
            for ref, pod_dir in orphaned_sandboxes(self.config.pods_dir, busy):
                log_fields(log, logging.INFO, "removing orphaned sandbox", pod=f"{ref.namespace}/{ref.name}")
                await asyncio.to_thread(teardown_sandbox, self.config, ref, pod_dir, self.cni_config)
        self.known_uids = set(mine)

    async def _terminate(self, uid: str, worker: PodWorker) -> None:
        try:
            await worker.stop(teardown=True)
        except Exception:
            log.exception("tearing down pod %s failed", worker.label)
        finally:
            self.terminating.pop(uid, None)


def set_ip_forward() -> None:
    """This node routes for its pods (sysctls under /proc/sys/net are those of our own netns)."""
    try:
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    except OSError as err:
        log_fields(log, logging.WARNING, "cannot enable ip_forward", error=str(err))


def add_pod_routes(app, agent_or_none) -> None:
    """The kubelet's paths on the health port: GET /containerLogs/{namespace}/{pod}/{container} and
    the WebSocket /exec/{namespace}/{pod}/{container}."""
    from aiohttp import web

    async def container_logs(request: web.Request) -> web.StreamResponse:
        agent = agent_or_none()
        info = request.match_info
        try:
            if agent is None:
                raise podlogs.LogError(503, "the agent is starting")
            query = podlogs.LogQuery.parse(request.query)
            path, record = agent.log_file(info["namespace"], info["pod"], info["container"], query.previous)
        except podlogs.LogError as err:
            return web.Response(status=err.status, text=err.message)
        first, offset = podlogs.read_log(path, query)
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(first)
        if query.follow:
            left = None if query.limit_bytes is None else query.limit_bytes - len(first)
            await podlogs.follow(path, offset, lambda: record.state == "running", response.write, left,
                                 lambda: agent.log_rotations.get(path, 0))
        await response.write_eof()
        return response

    def stream(verb: str, session):
        """A WebSocket endpoint for `verb`: the agent, the channel protocol and the target checked
        first (a refusal is a plain answer, before any upgrade), then `session(ws, container,
        protocol, request, target)` runs the streams."""
        async def handler(request: web.Request) -> web.StreamResponse:
            agent = agent_or_none()
            info = request.match_info
            protocol = podexec.choose_protocol(request.headers.get("Sec-WebSocket-Protocol", ""))
            try:
                if agent is None:
                    raise podexec.ExecError(503, "the agent is starting")
                if protocol is None:
                    raise podexec.ExecError(400, f"{verb} speaks {', '.join(podexec.PROTOCOLS)} over a WebSocket")
                wanted = podexec.ExecRequest.parse(request.query, attach=verb == "attach")
                target = (agent.attach_target if verb == "attach" else agent.exec_target)(
                    info["namespace"], info["pod"], info["container"])
            except podlogs.LogError as err:
                return web.Response(status=err.status, text=err.message)
            ws = web.WebSocketResponse(protocols=[protocol])
            await ws.prepare(request)
            await session(ws, info["container"], protocol, wanted, target)
            await ws.close()
            return ws
        return handler

    async def exec_session(ws, container: str, protocol: str, wanted, worker) -> None:
        log_fields(log, logging.INFO, "exec", pod=worker.label, container=container, command=wanted.command)
        await podexec.run(ws, runtime.process_argv(worker.ref.netns, worker.ref.hostname, list(wanted.command)),
                          wanted, protocol)

    async def attach_session(ws, container: str, protocol: str, wanted, target) -> None:
        worker, process, terminal = target
        record = container_record(worker, container)
        log_fields(log, logging.INFO, "attach", pod=worker.label, container=container, terminal=terminal is not None)
        await podexec.attach(ws, terminal, str(worker.dir / f"{container}.log"), lambda: record.state == "running",
                             asyncio.ensure_future(process.wait()), (container,))

    app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", container_logs)
    app.router.add_get("/exec/{namespace}/{pod}/{container}", stream("exec", exec_session))
    app.router.add_get("/attach/{namespace}/{pod}/{container}", stream("attach", attach_session))

    async def port_forward(request: web.Request) -> web.StreamResponse:
        """/portForward/{namespace}/{pod}: SPDY/3.1 over a WebSocket (netplane.portforward)."""
        agent = agent_or_none()
        info = request.match_info
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        try:
            if agent is None:
                raise podexec.ExecError(503, "the agent is starting")
            if portforward.PROTOCOL not in offered:
                raise podexec.ExecError(400, f"port-forward speaks {portforward.PROTOCOL} over a WebSocket")
            worker = agent.port_forward_target(info["namespace"], info["pod"])
        except podlogs.LogError as err:
            return web.Response(status=err.status, text=err.message)
        ws = web.WebSocketResponse(protocols=[portforward.PROTOCOL])
        await ws.prepare(request)
        try:
            session = await portforward.serve_websocket(ws, portforward.connector(worker.ref.netns), worker.label)
            log_fields(log, logging.INFO, "port-forward ended", pod=worker.label, connections=session.forwarded)
        except portforward.ProtocolError as err:
            log_fields(log, logging.WARNING, "port-forward: bad SPDY from the client", pod=worker.label, error=str(err))
        await ws.close()
        return ws

    app.router.add_get("/portForward/{namespace}/{pod}", port_forward)

    async def resource_stats(_request: web.Request) -> web.Response:
        """/stats/resource: the latest CPU and memory of this node and its containers (kubectl top)."""
        agent = agent_or_none()
        if agent is None:
            return web.Response(status=503, text="the agent is starting")
        return web.json_response(agent.resource_report())

    app.router.add_get("/stats/resource", resource_stats)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    daemon.setup_logging("agent")
    try:
        podnet.host_mount_prefix()  # fail now, not on every pod, when pod netns would be invisible
    except podnet.MountNamespaceError as err:
        log_fields(log, logging.ERROR, "cannot run pods", error=str(err))
        return 1
    log_fields(log, logging.INFO, "agent starting", node=config.node_name, node_ip=config.node_ip,
               server=config.server, state_dir=config.state_dir)
    # netplane-cni's resident helper (owned by cni/helper.py): this node's plugin execs forward ADD and
    # DEL to it, so wiring a pod costs little more than the interpreter's start-up.
    from netplane.cni import helper as cni_helper
    cni_helper_process = cni_helper.start_or_none()
    try:
        return daemon.run_client_daemon(lambda client: Agent(config, client), config.server, "agent",
                                        config.health_listen, Agent.healthy, add_pod_routes)
    finally:
        cni_helper.stop(cni_helper_process)


if __name__ == "__main__":
    sys.exit(main())
