"""The netplane/echo image for real: a server in a namespace, asked by real curl."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from netplane import netns
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.netns]

NETPLANE = os.path.join(os.path.dirname(sys.executable), "netplane")


def wait_for(check, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def curl(ns: str, *args: str) -> subprocess.CompletedProcess:
    return netns.run(["curl", "-sS", "--max-time", "5", *args], netns=ns, check=False)


@pytest.fixture
def pair(make_netns):
    """Two namespaces joined by a veth: the echo pod (10.77.0.2) and its client (10.77.0.1)."""
    server, client = make_netns("echo"), make_netns("cli")
    netns.run(["ip", "link", "add", "eth0", "netns", server, "type", "veth", "peer", "name", "eth0",
               "netns", client])
    for ns, addr in ((server, "10.77.0.2/24"), (client, "10.77.0.1/24")):
        netns.run(["ip", "addr", "add", addr, "dev", "eth0"], netns=ns)
        netns.run(["ip", "link", "set", "eth0", "up"], netns=ns)
    return server, client


@pytest.fixture
def echo_in(pair):
    procs = []

    def start(*ports: str, env: dict | None = None) -> subprocess.Popen:
        server, _ = pair
        argv = [NETPLANE, "echo", *[a for p in ports for a in ("--port", p)]]
        full_env = {**os.environ, "POD_NAME": "echo-abc", "POD_NAMESPACE": "shop", "POD_IP": "10.77.0.2",
                    "NODE_NAME": "worker-9", "NETPLANE_IMAGE": "netplane/echo:v2", **(env or {})}
        proc = subprocess.Popen(netns.in_netns(server, argv), env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_echo_answers_on_every_port_with_who_answered_and_who_asked(pair, echo_in):
    server, client = pair
    echo_in("8080", "9090")
    assert wait_for(lambda: curl(client, "http://10.77.0.2:9090/healthz").stdout == "ok\n")
    answer = curl(client, "-H", "Host: echo.shop.svc", "http://10.77.0.2:8080/some/path?q=1")
    assert answer.returncode == 0, answer.stderr
    fields = yaml.safe_load(answer.stdout)
    client_ip, client_port = fields.pop("client").rsplit(":", 1)
    assert client_ip == "10.77.0.1" and int(client_port) > 0
    assert fields == {"pod": "echo-abc", "namespace": "shop", "pod_ip": "10.77.0.2", "node": "worker-9",
                      "image": "netplane/echo:v2", "host": "echo.shop.svc", "method": "GET",
                      "path": "/some/path?q=1"}
    post = yaml.safe_load(curl(client, "-X", "POST", "-d", "x=1", "http://10.77.0.2:9090/p").stdout)
    assert post["method"] == "POST" and post["path"] == "/p"


def test_echo_keeps_connections_alive(pair, echo_in):
    server, client = pair
    echo_in()  # no --port: 8080
    assert wait_for(lambda: curl(client, "http://10.77.0.2:8080/healthz").stdout == "ok\n")
    answer = curl(client, "-v", "http://10.77.0.2:8080/one", "http://10.77.0.2:8080/two")
    clients = [line for line in answer.stdout.splitlines() if line.startswith("client:")]
    assert len(clients) == 2 and clients[0] == clients[1]  # same source port: one connection
    assert "Re-using existing connection" in answer.stderr


def test_echo_serves_ipv6_loopback_and_exits_cleanly_on_sigterm(pair, echo_in):
    server, _ = pair
    proc = echo_in("8080")
    assert wait_for(lambda: curl(server, "http://127.0.0.1:8080/healthz").stdout == "ok\n")
    v6 = curl(server, "http://[::1]:8080/v6")
    assert v6.returncode == 0 and yaml.safe_load(v6.stdout)["client"].startswith("[::1]:")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0
