"""A whole 3-node lab with real traffic: DNS through kube-dns, ClusterIP, NodePort, ingress, scaling.

One lab for the module (bringing it up is the expensive part); `lab down` runs even when a test
fails, and the last test checks it left nothing behind.
"""
from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netplane import lab, netns
from netplane.client import Client
from netplane.demo import (curl_in_pod, curl_many_in_pod, ensure_probe_pod, http_get, in_pod, netplane, parse_echo,
                           wait_deployment)
from tests.conftest import needs_root

pytestmark = [pytest.mark.e2e, needs_root]

ROOT = Path(__file__).resolve().parents[2]
NODES = lab.lab_nodes(3)
SERVER = lab.api_url(NODES)


def lab_pids() -> set[int]:
    """Every process in a lab namespace (daemons and pods)."""
    return {pid for name in netns.list_named() if lab.is_lab_name(name) for pid in netns.pids(name)}


def leftovers(pids: set[int] = frozenset()) -> list[str]:
    """What of the lab is still on the machine: namespaces, links, /etc/netns, root nft tables, processes."""
    found = [f"netns {n}" for n in netns.list_named() if lab.is_lab_name(n)]
    found += [f"link {n}" for n in os.listdir("/sys/class/net") if lab.is_lab_name(n)]
    if os.path.isdir("/etc/netns"):
        found += [f"/etc/netns/{n}" for n in os.listdir("/etc/netns") if lab.is_lab_name(n)]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    found += [f"nft {line}" for line in tables.splitlines() if "netplane" in line]
    found += [f"process {pid}" for pid in pids if lab._alive(pid)]
    if lab.LAB_DIR.exists():
        found.append(f"dir {lab.LAB_DIR}")
    return found


@pytest.fixture(scope="module")
def running_lab(tmp_path_factory):
    assert not leftovers(), f"the machine is not clean before the lab test: {leftovers()}"
    up = netplane("lab", "up", "--nodes", "3", check=False)
    try:
        assert up.returncode == 0, f"lab up failed:\n{up.stdout}\n{up.stderr}\n{_logs()}"
        for path in ("deployment.yaml", "service.yaml", "nodeport.yaml", "ingress.yaml"):
            out = netplane("apply", "-f", str(ROOT / "examples" / path), check=False)
            assert out.returncode == 0, out.stdout + out.stderr
        wait_deployment(SERVER, "echo")
        wait_deployment(SERVER, "echo-v2")
        ensure_probe_pod(SERVER)
        yield
    finally:
        keep_logs(tmp_path_factory.mktemp("lab-logs"))
        netplane("lab", "down", check=False)


def keep_logs(where: Path) -> None:
    """The daemons' logs outlive `lab down` in pytest's temp dir, for reading after a failure."""
    logs = lab.LAB_DIR / "logs"
    if logs.exists():
        shutil.copytree(logs, where, dirs_exist_ok=True)
        print(f"lab logs kept in {where}")


def _logs() -> str:
    logs = lab.LAB_DIR / "logs"
    if not logs.exists():
        return ""
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir()))


def service_ip(name: str, namespace: str = "default") -> str:
    async def get():
        async with Client(SERVER) as client:
            return (await client.get("Service", name, namespace))["spec"]["clusterIP"]
    return asyncio.run(get())


def pods_of(app: str) -> dict[str, dict]:
    async def get():
        async with Client(SERVER) as client:
            return (await client.list("Pod", "default", label_selector=f"app={app}"))["items"]
    return {p["metadata"]["name"]: p for p in asyncio.run(get())}


def answering_pods(url: str, count: int) -> collections.Counter:
    return collections.Counter(reply["pod"] for reply in curl_many_in_pod("client", url, count))


def test_pod_resolves_service_through_kube_dns(running_lab):
    answer = in_pod("client", ["dig", "+short", "+time=2", "echo.default.svc.cluster.local"]).split()
    assert answer == [service_ip("echo")]
    resolv = in_pod("client", ["cat", "/etc/resolv.conf"])
    assert "nameserver 10.96.0.10" in resolv and "default.svc.cluster.local" in resolv


def test_clusterip_spreads_over_pods_on_both_workers(running_lab):
    replies = curl_many_in_pod("client", "http://echo.default.svc.cluster.local/", 30)
    assert len(replies) == 30
    seen = collections.Counter(reply["pod"] for reply in replies)
    nodes = {reply["node"] for reply in replies}
    assert len(seen) >= 2, seen
    assert {"worker-1", "worker-2"} <= nodes, nodes
    assert set(seen) <= set(pods_of("echo"))


def test_short_name_and_cross_node_pod_ip(running_lab):
    assert curl_in_pod("client", "http://echo/")["pod"] in pods_of("echo")
    remote = [p for p in pods_of("echo").values() if p["spec"]["nodeName"] == "worker-2"]
    assert remote, "no echo pod on worker-2"
    reply = curl_in_pod("client", f"http://{remote[0]['status']['podIP']}:8080/")
    assert reply["pod"] == remote[0]["metadata"]["name"] and reply["node"] == "worker-2"


def test_host_reaches_nodeport_on_every_node(running_lab):
    echo_pods = set(pods_of("echo"))
    for node in NODES:
        status, body = http_get(f"http://{node.address}:30007/")
        assert status == 200, (node, body)
        assert parse_echo(body)["pod"] in echo_pods


def test_ingress_routes_by_host_and_path(running_lab):
    echo, echo_v2 = set(pods_of("echo")), set(pods_of("echo-v2"))
    base = f"http://{NODES[1].address}:30080"
    cases = [("echo.lab", "/", echo), ("echo.lab", "/v2", echo_v2), ("echo.lab", "/v2/x", echo_v2),
             ("v2.echo.lab", "/anything", echo_v2)]
    for host, path, expected in cases:
        status, body = http_get(base + path, host=host)
        assert status == 200, (host, path, body)
        assert parse_echo(body)["pod"] in expected, (host, path, body)
    assert http_get(base + "/", host="nope.lab")[0] == 404
    assert http_get(base + "/v2", host="other.example")[0] == 404


def test_ingress_status_shows_the_controllers_load_balancer_address(running_lab):
    """As ingress-nginx with --publish-service: `kubectl get ingress` ADDRESS is where to reach it."""
    async def addresses():
        async with Client(SERVER) as client:
            lb = (await client.get("Service", "ingress", "netplane-system"))["status"]["loadBalancer"]["ingress"]
            ing = (await client.get("Ingress", "echo", "default")).get("status") or {}
            return lb, ing.get("loadBalancer", {}).get("ingress")
    deadline = time.monotonic() + 10
    while True:
        lb, shown = asyncio.run(addresses())
        if (shown and shown == [{"ip": a["ip"]} for a in lb]) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert lb and shown == [{"ip": a["ip"]} for a in lb], (lb, shown)


def scale(replicas: int) -> None:
    async def patch():
        async with Client(SERVER) as client:
            await client.patch("Deployment", "echo", {"spec": {"replicas": replicas}}, "default")
    asyncio.run(patch())


def wait_answering_set(expected_count: int, timeout: float = 5.0) -> set[str]:
    """Poll until the pods answering through the Service are exactly the Deployment's ready pods."""
    deadline = time.monotonic() + timeout
    while True:
        seen = set(answering_pods("http://echo/", 12 * expected_count))
        current = set(pods_of("echo"))
        if len(seen) == expected_count and seen <= current:
            return seen
        assert time.monotonic() < deadline, f"answering {sorted(seen)}, pods {sorted(current)}"


def test_scaling_changes_the_answering_pods_within_5_seconds(running_lab):
    before = wait_answering_set(3)
    scale(5)
    started = time.monotonic()
    after_up = wait_answering_set(5, timeout=5.0)
    assert before < after_up and time.monotonic() - started < 5.0
    scale(2)
    started = time.monotonic()
    after_down = wait_answering_set(2, timeout=5.0)
    assert after_down < after_up and time.monotonic() - started < 5.0


def test_bad_manifest_is_refused_and_nothing_stored(running_lab, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: fine-cm}\ndata: {a: b}\n---\n"
                   "apiVersion: v1\nkind: Service\nmetadata: {name: no-ports}\nspec:\n  selector: {app: x}\n")
    out = netplane("apply", "-f", str(bad), check=False)
    assert out.returncode != 0
    assert "document 2" in out.stderr and "spec.ports" in out.stderr
    assert netplane("get", "service", "no-ports", check=False).returncode != 0
    fine = netplane("get", "configmap", "fine-cm", check=False)  # the good document was not applied either
    assert fine.returncode != 0 and "not found" in fine.stderr, fine.stdout + fine.stderr


def test_demo_shows_every_hop_working(running_lab):
    """`make demo`'s second half, against this lab: every hop prints what came back."""
    demo = subprocess.run([sys.executable, "-m", "netplane.demo"], capture_output=True, text=True, timeout=180)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = demo.stdout
    dns_answer = re.search(r"dig \+short echo.default.svc.cluster.local\s+->\s+(\S+)", out)
    assert dns_answer and dns_answer.group(1).startswith("10.96."), out
    answers = re.findall(r"^\s+(\d+) answers from (\S+) on (\S+)$", out, re.M)
    assert sum(int(n) for n, _, _ in answers) == 30 and len({node for _, _, node in answers}) == 2, out
    for node in lab.lab_nodes(3):
        assert re.search(rf"http://{re.escape(node.address)}:30007/ -> 200 from echo-", out), out
    assert re.search(r"Host: echo.lab\s+/\s+-> 200 echo-", out), out
    assert re.search(r"Host: nope.lab\s+/\s+-> 404", out), out
    assert re.search(r"http://192\.168\.56\.2\d\d/ -> 200 from echo-", out), out


def test_lab_down_leaves_nothing(running_lab, tmp_path_factory):
    """Runs last in this module: take the lab down and check the machine is as we found it."""
    keep_logs(tmp_path_factory.mktemp("lab-logs"))
    pids = lab_pids()
    assert len(pids) >= 8, pids  # apiserver, controllers, scheduler, agents, proxies, pods
    out = netplane("lab", "down", check=False)
    assert out.returncode == 0, out.stderr
    assert leftovers(pids) == []

