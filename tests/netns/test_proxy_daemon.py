"""`netplane proxy run` against a real API server: rules follow the objects, partial syncs,
stale UDP conntrack clean-up (answers resume within 1 s when the endpoint is replaced),
/healthz and /metrics. The API server and the proxy run inside the test's node namespace.
And the reconcile loop's failure path against the kernel: a failed apply keeps the old rules,
the retry is a full sync."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netplane import netns
from netplane.proxy.apply import ApplyError, NftBackend
from netplane.proxy.model import NodeFacts
from netplane.proxy.proxier import Proxier
from tests.conftest import needs_root
from tests.netns.test_proxy import EP1, EP2, NODE_IP, POD, WEB, Topology, answers
from tests.netns.test_proxy_partial import endpoint_slice as slice_object
from tests.netns.test_proxy_partial import service as service_object
from tests.netns.test_proxy_partial import table_contents

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


def metrics(lab: Lab) -> dict[tuple[str, tuple], float]:
    """The proxy's /metrics as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families
    code, text = lab.http_get("http://127.0.0.1:10256/metrics")
    assert code == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


SERVICES_PROGRAMMED = ("netplane_proxy_services_programmed", ())
RULES_PROGRAMMED = ("netplane_proxy_rules_programmed", ())
CHAINS_PROGRAMMED = ("netplane_proxy_chains_programmed", ())
LAST_SYNC = ("netplane_proxy_last_sync_timestamp_seconds", ())


def service_ports_in_api(lab: Lab) -> int:
    """Service ports the API server holds (every Service here is single-stack), the apiserver's
    own default/kubernetes included."""
    code, body = lab.http_get(f"{API}/api/v1/services")
    assert code == 200, body
    return sum(len(item["spec"].get("ports") or []) for item in json.loads(body)["items"]
               if item["spec"].get("type") != "ExternalName" and item["spec"].get("clusterIP") != "None")


def service_chains_in_kernel(lab: Lab) -> list[str]:
    """The per-Service-port chains of our nft table in the node namespace."""
    return [c for c in table_contents(lab.topo["node"])["chains"] if c.startswith("service-") and "/" in c]


def sync_count(values: dict, kind: str) -> float:
    return values.get(("netplane_proxy_sync_duration_seconds_count", (("kind", kind),)), 0.0)


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
    started = time.time()
    lab.apply(SERVICE + "---" + endpoint_slice(EP1))
    wait_until(lambda: topo.client("pod", "tcp", WEB, 80) == [f"ep1 {POD}"], what="ClusterIP -> ep1")
    # The rules answer a moment before the proxier records the sync it just applied.
    wait_until(lambda: lab.http_get("http://127.0.0.1:10256/healthz")[0] == 200, timeout=2.0,
               what="/healthz 200 after the first sync")
    # the Service ports programmed: web's two (TCP and UDP 80) and default/kubernetes
    ports = service_ports_in_api(lab)
    assert ports == 3
    first = wait_until(lambda: (lambda m: m if m[SERVICES_PROGRAMMED] == ports else None)(metrics(lab)),
                       what=f"services programmed = {ports}")
    chains = service_chains_in_kernel(lab)
    assert len(chains) == ports and sum("default/web/" in c for c in chains) == 2, chains
    assert started <= first[LAST_SYNC] <= time.time()
    assert first[RULES_PROGRAMMED] > 0 and first[CHAINS_PROGRAMMED] > 0
    assert sync_count(first, "full") >= 1

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

    last = metrics(lab)
    assert sync_count(last, "partial") > 0  # the changes after the first sync were partial syncs
    assert last[LAST_SYNC] > first[LAST_SYNC]
    assert last[SERVICES_PROGRAMMED] == service_ports_in_api(lab) == 3  # without endpoints: a REJECT
    assert last[RULES_PROGRAMMED] > 0


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
    values = metrics(lab)
    assert values[SERVICES_PROGRAMMED] == service_ports_in_api(lab) == 2  # local-web's, kubernetes'
    assert values[LAST_SYNC] > 0 and values[RULES_PROGRAMMED] > 0

    lab.apply(health_slice("node-b"))  # the only endpoint is now on another node
    code, body = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(lab.http_get(url)),
                            what="health check 503 without a local endpoint")
    assert json.loads(body)["localEndpoints"] == 0

    lab.apply(health_service("Cluster"))  # no health check for externalTrafficPolicy Cluster
    wait_until(lambda: lab.http_get(url)[0] == 0, what="health check port closed")


# --- a failed apply, against the kernel ---------------------------------------------------------

class ObjectsView:
    """A synced view of objects the test replaces."""

    def __init__(self, objs):
        self.objs = list(objs)

    def list(self, kind):
        return [o for o in self.objs if o["kind"] == kind]

    def is_synced(self):
        return True


FAIL_NODE = NodeFacts("node-a", node_ips=("192.168.77.1",), cluster_cidrs=("10.244.0.0/16",))
HTTP = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]


def test_failed_apply_keeps_the_old_rules_and_the_retry_is_a_full_sync(make_netns) -> None:
    node, fresh = make_netns("pxfail"), make_netns("pxref")
    web = [service_object("web", "10.96.0.50", HTTP), slice_object("web", ["10.244.1.10"])]
    gone = [service_object("gone", "10.96.0.53", HTTP), slice_object("gone", ["10.244.1.14"])]
    api = [service_object("api", "10.96.0.51", HTTP), slice_object("api", ["10.244.2.10"])]
    view = ObjectsView(web + gone)
    proxier = Proxier(view, FAIL_NODE, NftBackend(node), clean_conntrack=False)
    asyncio.run(proxier.sync())
    # Someone else holds a reference to the chain of Service "gone": the delta that deletes
    # that chain fails in the kernel (EBUSY), a real apply failure.
    gone_chain = next(c for c in table_contents(node)["chains"] if "default/gone/" in c)
    netns.run(["nft", "-f", "-"], netns=node, input=f"add chain ip netplane intruder\n"
                                                     f"add rule ip netplane intruder jump {gone_chain}\n")
    kept = table_contents(node)

    view.objs = web + api  # "gone" deleted, "api" added: a partial sync
    with pytest.raises(ApplyError, match="libnftables.*(busy|Device or resource)"):
        asyncio.run(proxier.sync())
    assert table_contents(node) == kept  # nothing half-applied: not even "api"'s elements
    assert proxier.pending_since is not None  # the change still waits, to be retried

    asyncio.run(proxier.sync())  # the retry: a full sync, which replaces the whole table
    assert proxier.pending_since is None and not proxier.force_full
    NftBackend(fresh).sync(proxier.model())
    assert table_contents(node) == table_contents(fresh)
    assert "intruder" not in table_contents(node)["chains"]
