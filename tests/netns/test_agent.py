"""The node agent for real: an API server and an agent in a node namespace, real netplane-cni,
real pods (namespaces + processes), real curl.

The node namespace has an eth0 with the node's address; the API server listens on it, the
agent runs beside it (entered with `nsenter --net`, as a node agent should be). The test talks to the
API with curl from inside the node namespace. Everything is removed even when a check fails.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from netplane import netns, podnet
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.netns]

REPO = Path(__file__).resolve().parents[2]
NETPLANE = os.path.join(os.path.dirname(sys.executable), "netplane")
NODE_IP = "192.168.99.11"
PEER_IP = "192.168.99.12"
API = f"http://{NODE_IP}:6443"
POD_CIDR = "10.251.1.0/24"
PEER_CIDR = "10.251.2.0/24"

needs_control_plane = pytest.mark.skipif(
    not (REPO / "netplane" / "apiserver.py").exists() or not (REPO / "cni" / "plugin.py").exists(),
    reason="needs netplane/apiserver.py and cni/plugin.py")


def wait_for(check, timeout=20.0, interval=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


class Cluster:
    """One node namespace with an API server and an agent; API calls are curl from inside it."""

    def __init__(self, node: str, tmp: Path):
        self.node, self.tmp = node, tmp
        self.state = tmp / "state"
        self.procs: dict[str, subprocess.Popen] = {}
        self.uids: set[str] = set()

    def start(self, name: str, *argv: str, entry: str = "nsenter") -> None:
        """Start a daemon in the node's netns: `nsenter --net` (recommended), or `ip netns exec`
        (a private mount namespace too, as the lab does)."""
        log = open(self.tmp / f"{name}.log", "ab")
        full = [NETPLANE, *argv]
        if entry == "nsenter":
            full = ["nsenter", f"--net={netns.NETNS_DIR}/{self.node}", "--", *full]
        else:
            full = netns.in_netns(self.node, full)
        self.procs[name] = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def start_agent(self, entry: str = "nsenter", cni_bin_dir: str | None = None) -> None:
        extra = ["--cni-bin-dir", cni_bin_dir] if cni_bin_dir else []
        self.start("agent", "agent", "--server", API, "--node-name", "worker-1", "--node-ip", NODE_IP,
                   "--state-dir", str(self.state), "--health-listen", f"{NODE_IP}:10248",
                   "--node-labels", "tier=test", *extra, entry=entry)

    def curl(self, *args: str) -> subprocess.CompletedProcess:
        return netns.run(["curl", "-sS", "--max-time", "5", *args], netns=self.node, check=False)

    def api(self, method: str, path: str, body: dict | None = None, merge: bool = False) -> dict:
        args = ["-X", method, f"{API}{path}"]
        if body is not None:
            ctype = "application/merge-patch+json" if merge else "application/json"
            args += ["-H", f"Content-Type: {ctype}", "--data-binary", json.dumps(body)]
        out = self.curl(*args)
        return json.loads(out.stdout) if out.stdout.strip() else {}

    def get(self, path: str) -> dict:
        """The object, or {} while it does not exist (the server answers a Status)."""
        obj = self.api("GET", path)
        return {} if obj.get("kind") in ("Status", None) else obj

    def pod(self, name: str) -> dict:
        pod = self.get(f"/api/v1/namespaces/default/pods/{name}")
        if pod.get("metadata", {}).get("uid"):
            self.uids.add(pod["metadata"]["uid"])
        return pod

    def create_pod(self, name: str, containers: list[dict], **spec) -> dict:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
               "spec": {"nodeName": "worker-1", "containers": containers, **spec}}
        created = self.api("POST", "/api/v1/namespaces/default/pods", pod)
        assert created.get("metadata", {}).get("uid"), created
        self.uids.add(created["metadata"]["uid"])
        return created

    def cleanup(self) -> None:
        """Stop our daemons, then remove every pod namespace the agent made (it leaves pods running)."""
        for name in reversed(list(self.procs)):  # the agent before the API server
            self.stop(name)
        for sandbox in self.state.glob("pods/*/sandbox.json"):
            self.uids.add(json.loads(sandbox.read_text()).get("uid", ""))
        for uid in filter(None, self.uids):
            netns.delete(podnet.netns_name(uid))
            podnet.remove_etc_files(podnet.netns_name(uid))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self.tmp.glob("*.log"))


@pytest.fixture
def cluster(make_netns, tmp_path):
    node = make_netns("node")
    # eth0 with the node's address (a veth whose peer stays in the node: no dummy module needed)
    netns.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "underlay"], netns=node)
    netns.run(["ip", "addr", "add", f"{NODE_IP}/24", "dev", "eth0"], netns=node)
    for link in ("eth0", "underlay"):
        netns.run(["ip", "link", "set", link, "up"], netns=node)
    c = Cluster(node, tmp_path)
    try:
        c.start("apiserver", "apiserver", "--listen", f"{NODE_IP}:6443", "--db", str(tmp_path / "store.db"))
        wait_for(lambda: c.curl(f"{API}/healthz").returncode == 0, what="the API server")
        c.api("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
        c.start_agent()
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.cleanup()


def ready(pod: dict) -> bool:
    return any(cond.get("type") == "Ready" and cond.get("status") == "True"
               for cond in pod.get("status", {}).get("conditions") or [])


@needs_control_plane
def test_agent_registers_wires_network_runs_echo_and_removes_it(cluster):
    c = cluster
    # the Node: registered with addresses, labels, Ready; then the podCIDR (the controller's job) by hand
    node = wait_for(lambda: (n := c.get("/api/v1/nodes/worker-1")).get("status", {}).get("addresses") and n,
                    what="the Node")
    assert {"type": "InternalIP", "address": NODE_IP} in node["status"]["addresses"]
    assert node["metadata"]["labels"]["kubernetes.io/hostname"] == "worker-1"
    assert node["metadata"]["labels"]["tier"] == "test"
    assert [cond["status"] for cond in node["status"]["conditions"] if cond["type"] == "Ready"] == ["True"]
    c.api("PATCH", "/api/v1/nodes/worker-1", {"spec": {"podCIDR": POD_CIDR}}, merge=True)
    conf = c.state / "cni" / "10-netplane.conf"
    wait_for(conf.exists, what="the CNI config")
    assert json.loads(conf.read_text())["ipam"]["ranges"] == [[{"subnet": POD_CIDR, "gateway": "10.251.1.1"}]]

    # another node appears: a route to its pod CIDR via its address; it goes: the route goes
    c.api("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "worker-2"},
                                    "spec": {"podCIDR": PEER_CIDR}})
    c.api("PATCH", "/api/v1/nodes/worker-2/status",
          {"status": {"addresses": [{"type": "InternalIP", "address": PEER_IP}]}}, merge=True)

    def routes() -> str:
        return netns.run(["ip", "route", "show", "proto", "78"], netns=c.node).stdout
    wait_for(lambda: f"{PEER_CIDR} via {PEER_IP}" in routes(), what="the route to worker-2's pods")

    # a pod: IP from the node's CIDR, Ready once echo listens, answering with its own name
    uid = c.create_pod("echo-1", [{"name": "echo", "image": "netplane/echo:v2", "ports": [{"containerPort": 8080}]}])["metadata"]["uid"]
    pod = wait_for(lambda: ready(p := c.pod("echo-1")) and p, what="echo-1 Ready")
    status = pod["status"]
    assert status["phase"] == "Running" and status["hostIP"] == NODE_IP
    assert status["podIP"].startswith("10.251.1.") and status["podIPs"] == [{"ip": status["podIP"]}]
    (container,) = status["containerStatuses"]
    assert container["ready"] and container["restartCount"] == 0 and "running" in container["state"]
    answer = c.curl(f"http://{status['podIP']}:8080/hello")
    fields = yaml.safe_load(answer.stdout)
    assert (fields["pod"], fields["namespace"], fields["pod_ip"], fields["node"], fields["image"]) == \
        ("echo-1", "default", status["podIP"], "worker-1", "netplane/echo:v2")
    pod_ns = podnet.netns_name(uid)
    assert netns.exists(pod_ns)
    assert "nameserver 10.96.0.10" in Path(f"/etc/netns/{pod_ns}/resolv.conf").read_text()
    assert (c.state / "pods" / f"default_echo-1_{uid}" / "echo.log").exists()
    assert c.curl(f"http://{NODE_IP}:10248/healthz").stdout.startswith("ok")
    assert "netplane_agent_pods 1.0" in c.curl(f"http://{NODE_IP}:10248/metrics").stdout

    # deleting the pod stops it and removes its namespace, files and state
    c.api("DELETE", "/api/v1/namespaces/default/pods/echo-1")
    # the agent removes the netns, then its /etc files, then the pod's state: wait for the last
    wait_for(lambda: not (c.state / "pods" / f"default_echo-1_{uid}").exists(), what="the pod's state to go")
    assert not netns.exists(pod_ns)
    assert not Path(f"/etc/netns/{pod_ns}").exists()
    assert c.curl("--max-time", "1", f"http://{status['podIP']}:8080/").returncode != 0

    c.api("DELETE", "/api/v1/nodes/worker-2")
    wait_for(lambda: PEER_CIDR not in routes(), what="the route to worker-2 to go")


@needs_control_plane
def test_agent_reports_image_errors_crashes_and_restarts(cluster):
    c = cluster
    wait_for(lambda: c.get("/api/v1/nodes/worker-1"), what="the Node")
    c.api("PATCH", "/api/v1/nodes/worker-1", {"spec": {"podCIDR": POD_CIDR}}, merge=True)
    c.create_pod("nginx", [{"name": "web", "image": "nginx:1.25"}])
    c.create_pod("once", [{"name": "job", "image": "busybox", "command": ["sh", "-c", "echo hi from $(POD_NAME); exit 3"]}],
                 restartPolicy="Never")
    c.create_pod("crasher", [{"name": "crash", "image": "busybox", "command": ["sh", "-c", "echo crashing; exit 1"]}])
    c.create_pod("dnsnone", [{"name": "job", "image": "busybox", "command": ["cat", "/etc/resolv.conf"]}],
                 restartPolicy="Never", dnsPolicy="None",
                 dnsConfig={"nameservers": ["10.96.0.10"], "searches": ["corp.example"],
                            "options": [{"name": "ndots", "value": "2"}]})
    c.create_pod("http", [{"name": "echo", "image": "netplane/echo", "args": ["--port", "9000"],
                           "readinessProbe": {"httpGet": {"path": "/healthz", "port": 9000}, "periodSeconds": 1}}])
    c.create_pod("unhealthy", [{"name": "app", "image": "busybox", "command": ["sleep", "3600"],
                                "livenessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1,
                                                  "failureThreshold": 2}}])
    c.create_pod("probed", [{"name": "app", "image": "busybox", "command": ["sleep", "3600"],
                             "readinessProbe": {"exec": {"command": ["test", "-f", "/tmp/np-never"]},
                                                "periodSeconds": 1}}])

    def waiting_reason(name):
        statuses = c.pod(name).get("status", {}).get("containerStatuses") or [{}]
        return statuses[0].get("state", {}).get("waiting", {}).get("reason")

    wait_for(lambda: waiting_reason("nginx") == "ErrImagePull", what="ErrImagePull")
    nginx = c.pod("nginx")["status"]
    assert nginx["phase"] == "Pending" and "netplane/echo" in nginx["message"] and "command:" in nginx["message"]

    once = wait_for(lambda: (p := c.pod("once"))["status"].get("phase") == "Failed" and p, what="once to fail")
    assert once["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    log = c.state / "pods" / f"default_once_{once['metadata']['uid']}" / "job.log"
    assert log.read_text() == "hi from once\n"
    dnsnone = wait_for(lambda: (p := c.pod("dnsnone"))["status"].get("phase") == "Succeeded" and p,
                       what="dnsnone to finish")
    log = c.state / "pods" / f"default_dnsnone_{dnsnone['metadata']['uid']}" / "job.log"
    assert log.read_text() == "search corp.example\nnameserver 10.96.0.10\noptions ndots:2\n"  # dnsConfig alone

    def backing_off(pod):
        (status,) = pod["status"].get("containerStatuses") or [{}]
        return status.get("restartCount", 0) >= 1 and "CrashLoopBackOff" in json.dumps(status.get("state"))
    crasher = wait_for(lambda: backing_off(p := c.pod("crasher")) and p, what="crasher restarted and backing off")
    assert crasher["status"]["phase"] == "Running" and not ready(crasher)
    assert crasher["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] == 1
    crash_dir = c.state / "pods" / f"default_crasher_{crasher['metadata']['uid']}"
    assert (crash_dir / "crash.previous.log").read_text() == "crashing\n"   # kubectl logs --previous
    assert (crash_dir / "crash.log").read_text() == "crashing\n"            # this run's only, not every run's

    unhealthy = wait_for(lambda: (p := c.pod("unhealthy"))["status"]["containerStatuses"][0]["restartCount"] >= 1 and p,
                         what="unhealthy restarted by its liveness probe")
    assert unhealthy["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] == 143  # SIGTERM

    http = wait_for(lambda: ready(p := c.pod("http")) and p, what="http Ready by its httpGet probe")
    assert yaml.safe_load(c.curl(f"http://{http['status']['podIP']}:9000/").stdout)["pod"] == "http"

    probed = wait_for(lambda: (p := c.pod("probed"))["status"].get("phase") == "Running" and p, what="probed running")
    assert not ready(probed) and probed["status"]["podIP"]
    ns = podnet.netns_name(probed["metadata"]["uid"])
    netns.run(["touch", "/tmp/np-never"], netns=ns)  # same /tmp: the probe passes now
    try:
        wait_for(lambda: ready(c.pod("probed")), what="probed Ready after its exec probe passes")
    finally:
        os.unlink("/tmp/np-never")


@needs_control_plane
def test_agent_restart_leaves_pods_running_adopts_them_and_cleans_orphans(cluster):
    c = cluster
    wait_for(lambda: c.get("/api/v1/nodes/worker-1"), what="the Node")
    c.api("PATCH", "/api/v1/nodes/worker-1", {"spec": {"podCIDR": POD_CIDR}}, merge=True)
    c.create_pod("echo-a", [{"name": "echo", "image": "netplane/echo"}])
    c.create_pod("echo-gone", [{"name": "echo", "image": "netplane/echo"}])
    a = wait_for(lambda: ready(p := c.pod("echo-a")) and p, what="echo-a Ready")
    gone = wait_for(lambda: ready(p := c.pod("echo-gone")) and p, what="echo-gone Ready")

    before = set(netns.pids(podnet.netns_name(a["metadata"]["uid"])))
    c.stop("agent")  # SIGTERM: the agent goes, its pods stay
    for pod in (a, gone):
        answer = c.curl(f"http://{pod['status']['podIP']}:8080/")
        assert yaml.safe_load(answer.stdout)["pod"] == pod["metadata"]["name"]

    c.api("DELETE", "/api/v1/namespaces/default/pods/echo-gone")  # deleted while the agent is down
    c.start_agent(entry="ip-netns-exec")  # as the lab starts it: in a private mount namespace
    gone_ns = podnet.netns_name(gone["metadata"]["uid"])
    wait_for(lambda: not netns.exists(gone_ns), what="the orphaned sandbox of echo-gone to go")
    assert not Path(f"/etc/netns/{gone_ns}").exists()

    # echo-a keeps its sandbox and IP; its container is started afresh and answers again
    a_ns = podnet.netns_name(a["metadata"]["uid"])
    wait_for(lambda: netns.pids(a_ns) and not set(netns.pids(a_ns)) & before, what="echo-a's container restarted")
    answer = wait_for(lambda: (r := c.curl(f"http://{a['status']['podIP']}:8080/")).returncode == 0 and r,
                      what="echo-a answering again")
    assert yaml.safe_load(answer.stdout)["pod"] == "echo-a"
    again = wait_for(lambda: ready(p := c.pod("echo-a")) and p, what="echo-a Ready again")
    assert again["status"]["podIP"] == a["status"]["podIP"]

    # a new pod made from the private mount namespace is still visible to everyone
    c.create_pod("echo-c", [{"name": "echo", "image": "netplane/echo"}])
    new = wait_for(lambda: ready(p := c.pod("echo-c")) and p, what="echo-c Ready")
    assert netns.exists(podnet.netns_name(new["metadata"]["uid"]))
    assert netns.run(["ip", "-o", "addr", "show", "eth0"], netns=podnet.netns_name(new["metadata"]["uid"])
                     ).stdout.count(new["status"]["podIP"]) == 1


FLAKY_PLUGIN = """#!/bin/sh
# netplane-cni, except that ADD fails (CNI code 11, try again later) until {allow} exists
if [ "$CNI_COMMAND" = ADD ] && [ ! -e {allow} ]; then
    echo '{{"cniVersion": "1.0.0", "code": 11, "msg": "try again later (test)"}}'
    exit 1
fi
exec {real} "$@"
"""


@needs_control_plane
def test_agent_retries_a_failed_cni_add_and_reports_it(cluster):
    c = cluster
    c.stop("agent")
    bin_dir, allow = c.tmp / "cni-bin", c.tmp / "allow-add"
    bin_dir.mkdir()
    plugin = bin_dir / "netplane-cni"
    plugin.write_text(FLAKY_PLUGIN.format(allow=allow, real=os.path.join(os.path.dirname(sys.executable), "netplane-cni")))
    plugin.chmod(0o755)
    c.start_agent(cni_bin_dir=str(bin_dir))
    wait_for(lambda: c.get("/api/v1/nodes/worker-1"), what="the Node")
    c.api("PATCH", "/api/v1/nodes/worker-1", {"spec": {"podCIDR": POD_CIDR}}, merge=True)
    c.create_pod("echo-x", [{"name": "echo", "image": "netplane/echo"}])
    failing = wait_for(lambda: (p := c.pod("echo-x"))["status"].get("reason") == "FailedCreatePodSandBox" and p,
                       what="the failed CNI ADD in the pod's status")
    assert "code 11: try again later (test)" in failing["status"]["message"]
    assert failing["status"]["phase"] == "Pending" and "podIP" not in failing["status"]
    allow.touch()
    pod = wait_for(lambda: ready(p := c.pod("echo-x")) and p, what="echo-x Ready after the retry")
    assert "reason" not in pod["status"] and "message" not in pod["status"]
    assert yaml.safe_load(c.curl(f"http://{pod['status']['podIP']}:8080/").stdout)["pod"] == "echo-x"


@needs_control_plane
def test_agent_runs_many_pods_at_once_with_distinct_ips(cluster):
    c = cluster
    wait_for(lambda: c.get("/api/v1/nodes/worker-1"), what="the Node")
    c.api("PATCH", "/api/v1/nodes/worker-1", {"spec": {"podCIDR": POD_CIDR}}, merge=True)
    names = [f"many-{i}" for i in range(12)]
    for name in names:
        c.create_pod(name, [{"name": "echo", "image": "netplane/echo"}])
    started = time.monotonic()
    def all_ready():
        current = [c.pod(n) for n in names]
        return all(ready(p) for p in current) and current
    pods = wait_for(all_ready, timeout=60, what="all pods Ready")
    print(f"{len(names)} pods Ready in {time.monotonic() - started:.1f}s")
    ips = [p["status"]["podIP"] for p in pods]
    assert len(set(ips)) == len(names)
    for pod in pods:  # every pod answers as itself
        assert yaml.safe_load(c.curl(f"http://{pod['status']['podIP']}:8080/").stdout)["pod"] == pod["metadata"]["name"]
    for name in names:
        c.api("DELETE", f"/api/v1/namespaces/default/pods/{name}")
    wait_for(lambda: not any(netns.exists(podnet.netns_name(p["metadata"]["uid"])) for p in pods),
             timeout=30, what="every pod netns removed")
    assert not list((c.state / "ipam").rglob("10.251.1.*"))  # every address released


@needs_control_plane
def test_an_ephemeral_container_runs_once_in_the_pods_namespace(cluster):
    """What `kubectl debug pod --image=busybox -- CMD` does: the container joins the running pod."""
    c = cluster
    wait_for(lambda: c.get("/api/v1/nodes/worker-1"), what="the Node")
    c.api("PATCH", "/api/v1/nodes/worker-1", {"spec": {"podCIDR": POD_CIDR}}, merge=True)
    uid = c.create_pod("web", [{"name": "echo", "image": "netplane/echo", "ports": [{"containerPort": 8080}]}])["metadata"]["uid"]
    pod = wait_for(lambda: ready(p := c.pod("web")) and p, what="web Ready")
    debug = {"name": "dbg", "image": "busybox", "stdin": False, "tty": False,
             "command": ["sh", "-c", "curl -s localhost:8080/ | head -1; ip -4 -o addr show eth0"]}
    patched = c.api("PATCH", "/api/v1/namespaces/default/pods/web/ephemeralcontainers",
                    {"spec": {"ephemeralContainers": [debug]}}, merge=True)
    assert [e["name"] for e in patched["spec"]["ephemeralContainers"]] == ["dbg"]

    def finished() -> dict:
        statuses = c.pod("web").get("status", {}).get("ephemeralContainerStatuses") or []
        return statuses and "terminated" in statuses[0]["state"] and statuses[0]
    status = wait_for(finished, what="the ephemeral container to finish")
    assert status["state"]["terminated"]["exitCode"] == 0 and status["restartCount"] == 0
    output = (c.state / "pods" / f"default_web_{uid}" / "dbg.log").read_text()
    assert "pod: web" in output and pod["status"]["podIP"] in output   # the pod's localhost, the pod's eth0
    after = c.pod("web")
    assert ready(after) and after["status"]["containerStatuses"][0]["restartCount"] == 0   # the pod went on
    removed = c.api("PATCH", "/api/v1/namespaces/default/pods/web/ephemeralcontainers",
                    {"spec": {"ephemeralContainers": []}}, merge=True)
    assert removed["code"] == 422 and 'existing ephemeral containers "dbg" may not be removed' in removed["message"]
