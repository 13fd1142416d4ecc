"""The agent's sandbox steps for real, without an API server: from inside a node namespace (entered
with `ip netns exec`, as the lab starts agents), create a pod's netns through the real netplane-cni,
run a container process in it, reach it, then tear it all down."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from netplane import netns, podnet
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.netns]

REPO = Path(__file__).resolve().parents[2]
CIDR = "10.250.7.0/24"


def in_node(node: str, code: str, entry: str) -> str:
    """Run Python `code` inside the node's network namespace, entered as an agent would be: with
    `ip netns exec` (which adds a private mount namespace) or `nsenter --net` (which does not)."""
    argv = [sys.executable, "-c", code]
    if entry == "nsenter":
        argv = ["nsenter", f"--net={netns.NETNS_DIR}/{node}", "--", *argv]
        return netns.run(argv, timeout=60).stdout
    return netns.run(argv, netns=node, timeout=60).stdout


SETUP = """
import json, sys
from pathlib import Path
from netplane import agent, podnet
config = agent.AgentConfig(server="http://127.0.0.1:1", node_name="n1", node_ip="10.0.0.1",
                           state_dir={state!r}, cni_bin_dir={bin!r})
ref = podnet.PodRef("shop", "web-1", {uid!r}, "web-1")
cni = podnet.network_config({cidr!r}, config.state_dir)
podnet.write_network_config(config.cni_config_path, cni)
ip = agent.create_sandbox(config, cni, ref, config.pods_dir / ref.dir_name)
print(json.dumps({{"ip": ip, "netns": ref.netns}}))
"""

TEARDOWN = """
from netplane import agent, podnet
config = agent.AgentConfig(server="http://127.0.0.1:1", node_name="n1", node_ip="10.0.0.1",
                           state_dir={state!r}, cni_bin_dir={bin!r})
ref = podnet.PodRef("shop", "web-1", {uid!r}, "web-1")
agent.teardown_sandbox(config, ref, config.pods_dir / ref.dir_name, None)
"""


@pytest.fixture
def pod_sandbox(make_netns, tmp_path):
    node = make_netns("node")
    uid = str(uuid.uuid4())
    pod_ns = podnet.netns_name(uid)
    fill = dict(state=str(tmp_path), bin=os.path.dirname(sys.executable), uid=uid, cidr=CIDR)
    try:
        yield node, fill, pod_ns
    finally:
        netns.delete(pod_ns)
        podnet.remove_etc_files(pod_ns)


@pytest.mark.parametrize("entry", ["ip-netns-exec", "nsenter"])
def test_sandbox_create_run_reach_and_teardown(pod_sandbox, tmp_path, entry):
    from netplane import runtime
    node, fill, pod_ns = pod_sandbox
    created = json.loads(in_node(node, SETUP.format(**fill), entry))
    pod_ip = created["ip"]
    assert created["netns"] == pod_ns and pod_ip.startswith("10.250.7.") and pod_ip != "10.250.7.1"

    # made from a private mount namespace, the pod's netns is still visible to everyone
    assert netns.exists(pod_ns)
    assert netns.run(["ip", "-j", "addr", "show", "eth0"], netns=pod_ns).stdout.count(pod_ip) == 1
    resolv = Path(f"/etc/netns/{pod_ns}/resolv.conf").read_text()
    assert resolv == "search shop.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
    assert Path(f"/etc/netns/{pod_ns}/hosts").read_text().endswith(f"{pod_ip}\tweb-1\n")
    sandbox = json.loads((tmp_path / "pods" / f"shop_web-1_{fill['uid']}" / "sandbox.json").read_text())
    assert sandbox["podIP"] == pod_ip and sandbox["cniConfig"]["type"] == "netplane-cni"

    # a container: the pod's hostname and resolv.conf, and an echo server the node can reach
    log = tmp_path / "probe.log"
    probe = subprocess.run(runtime.process_argv(pod_ns, "web-1", ["sh", "-c", "hostname; cat /etc/resolv.conf"]),
                           capture_output=True, text=True, timeout=10)
    assert probe.stdout.splitlines()[0] == "web-1" and "nameserver 10.96.0.10" in probe.stdout
    env = {**os.environ, "POD_NAME": "web-1", "POD_IP": pod_ip, "NODE_NAME": "n1"}
    echo = subprocess.Popen(runtime.process_argv(pod_ns, "web-1", [*runtime.netplane_entry(), "echo", "--port", "8080"]),
                            env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        answer = None
        while time.monotonic() < deadline:
            answer = netns.run(["curl", "-sS", "--max-time", "2", f"http://{pod_ip}:8080/"], netns=node, check=False)
            if answer.returncode == 0:
                break
            time.sleep(0.05)
        fields = yaml.safe_load(answer.stdout)
        assert fields["pod"] == "web-1" and fields["pod_ip"] == pod_ip
        assert fields["client"].startswith("10.250.7.1:")  # the node reaches pods from its cni0 gateway
    finally:
        echo.kill()
        echo.wait()

    in_node(node, TEARDOWN.format(**fill), entry)
    assert not netns.exists(pod_ns)
    assert not Path(f"/etc/netns/{pod_ns}").exists()
    assert not (tmp_path / "pods" / f"shop_web-1_{fill['uid']}").exists()
    ipam_files = [p.name for p in (tmp_path / "ipam").rglob("*") if p.is_file()]
    assert pod_ip not in ipam_files  # the address went back to the pool
