"""`netplane proxy run` against a real API server: rules follow the objects, partial syncs,
stale UDP conntrack clean-up (answers resume within 1 s when the endpoint is replaced),
/healthz and /metrics. The API server and the proxy run inside the test's node namespace."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netplane import netns
from tests.conftest import needs_root
from tests.netns.test_proxy import EP1, EP2, NODE_IP, POD, WEB, Topology, answers

pytestmark = [needs_root, pytest.mark.netns]

API = "http://127.0.0.1:16443"

SERVICE = f"""
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {WEB}
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}
  - {{name: udp, port: 80, targetPort: 8080, protocol: UDP}}
"""


def endpoint_slice(*ips: str) -> str:
    endpoints = "".join(f"\n- {{addresses: [{ip}], nodeName: node-a}}" for ip in ips) or " []"
    return f"""
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
endpoints:{endpoints}
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: udp, port: 8080, protocol: UDP}}
"""


UDP_STREAM = r"""
import socket, sys, time
ip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 45000)); s.settimeout(0.1)
end = time.time() + seconds
while time.time() < end:
    s.sendto(b"hi", (ip, port))
    try:
        reply = s.recv(2048).decode().split()[0]
    except socket.timeout:
        reply = "TIMEOUT"
    print(f"{time.time():.3f} {reply}", flush=True)
    time.sleep(0.05)
"""


class Lab:
    def __init__(self, topo: Topology, tmp: Path):
        self.topo, self.tmp, self.procs = topo, tmp, {}

    def start(self, name: str, *args: str) -> None:
        log = open(self.tmp / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(
            netns.in_netns(self.topo["node"], [sys.executable, "-m", "netplane", *args]),
            stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def apply(self, text: str) -> None:
        path = self.tmp / "apply.yaml"
        path.write_text(text)
        netns.run([sys.executable, "-m", "netplane", "apply", "-f", str(path), "--server", API],
                  netns=self.topo["node"])

    def http_get(self, url: str) -> tuple[int, str]:
        proc = netns.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", url], netns=self.topo["node"], check=False)
        body, _, code = proc.stdout.rpartition("\n")
        return int(code or 0), body


def wait_until(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def lab(tmp_path: Path):
    topo = Topology()
    lab = Lab(topo, tmp_path)
    try:
        topo.build()
        lab.start("apiserver", "apiserver", "--listen", "127.0.0.1:16443", "--db", str(tmp_path / "api.db"))
        wait_until(lambda: lab.http_get(f"{API}/healthz")[0] == 200, what="the API server")
        lab.start("proxy", "proxy", "run", "--server", API, "--node-name", "node-a", "--node-ip", NODE_IP,
                  "--cluster-cidr", "10.244.0.0/16", "--health-listen", "127.0.0.1:10256",
                  "--min-sync-interval", "0.05")
        yield lab
    finally:
        lab.stop()
        netns.run([sys.executable, "-m", "netplane", "proxy", "sync", "--cleanup"], netns=topo["node"], check=False)
        topo.destroy()


def test_rules_follow_the_api_and_udp_answers_resume_after_endpoint_replaced(lab: Lab) -> None:
    topo = lab.topo
    lab.apply(SERVICE + "---" + endpoint_slice(EP1))
    wait_until(lambda: topo.client("pod", "tcp", WEB, 80) == [f"ep1 {POD}"], what="ClusterIP -> ep1")
    assert lab.http_get("http://127.0.0.1:10256/healthz")[0] == 200

    stream = subprocess.Popen(netns.in_netns(topo["pod"], [sys.executable, "-c", UDP_STREAM, WEB, "80", "4"]),
                              stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: stream.stdout.readline().split()[1:] == ["ep1"], what="UDP answers from ep1")
        lab.apply(endpoint_slice(EP2))  # ep1 replaced by ep2; ep1 still answers if asked
        replaced_at = time.time()
        out, _ = stream.communicate(timeout=20)
    finally:
        stream.kill()
    after = [(float(t), who) for t, who in (line.split() for line in out.splitlines()) if float(t) > replaced_at]
    first_ep2 = next(t for t, who in after if who == "ep2")
    assert first_ep2 - replaced_at < 1.0, after[:20]
    assert all(who == "ep2" for t, who in after if t > first_ep2), after

    lab.apply(endpoint_slice(EP1, EP2))
    wait_until(lambda: answers(topo.client("pod", "tcp", WEB, 80, 20))[0] == {"ep1", "ep2"},
               what="both endpoints")
    lab.apply(endpoint_slice())
    wait_until(lambda: topo.client("pod", "tcp", WEB, 80) == ["REFUSED"], what="REJECT without endpoints")

    code, metrics = lab.http_get("http://127.0.0.1:10256/metrics")
    assert code == 200
    assert 'netplane_proxy_sync_duration_seconds_count{kind="partial"}' in metrics
    assert "netplane_proxy_last_sync_timestamp_seconds" in metrics
    assert "netplane_proxy_rules_programmed" in metrics



def health_service(policy: str) -> str:
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: local-web, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.60
  externalTrafficPolicy: {policy}
  healthCheckNodePort: 32100
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30090}}]
"""


def health_slice(node_name: str) -> str:
    return f"""
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: local-web-1, namespace: default, labels: {{kubernetes.io/service-name: local-web}}}}
addressType: IPv4
endpoints: [{{addresses: [{EP1}], nodeName: {node_name}}}]
ports: [{{name: http, port: 8080, protocol: TCP}}]
"""


def test_health_check_node_port_answers_with_local_endpoints(lab: Lab) -> None:
    url = f"http://{NODE_IP}:32100/"
    lab.apply(health_service("Local") + "---" + health_slice("node-a"))
    code, body = wait_until(lambda: (lambda r: r if r[0] == 200 else None)(lab.http_get(url)),
                            what="health check 200 with a local endpoint")
    answer = json.loads(body)
    assert answer["service"] == {"namespace": "default", "name": "local-web"}
    assert answer["localEndpoints"] == 1

    lab.apply(health_slice("node-b"))  # the only endpoint is now on another node
    code, body = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(lab.http_get(url)),
                            what="health check 503 without a local endpoint")
    assert json.loads(body)["localEndpoints"] == 0

    lab.apply(health_service("Cluster"))  # no health check for externalTrafficPolicy Cluster
    wait_until(lambda: lab.http_get(url)[0] == 0, what="health check port closed")
