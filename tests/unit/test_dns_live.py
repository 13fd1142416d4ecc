"""Live mode: `netplane dns serve --server URL` against the real `netplane apiserver`, both on
127.0.0.1. SERVFAIL and not-ready until the first sync; then names follow Services and
EndpointSlices as they are created and deleted."""
from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from netplane.client import Client
from netplane.dns.testing import ServerProcess, dig

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig (dnsutils)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def poll(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def ready_status(port: int) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5).status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture
def apiserver_port(tmp_path):
    port = free_port()
    procs = []

    def start():
        # advertise a documentation address: the kubernetes Service's endpoint must not be loopback
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "netplane", "apiserver", "--listen", f"127.0.0.1:{port}",
             "--db", str(tmp_path / "store.db"), "--advertise-address", "192.0.2.10"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    yield port, start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def api(port: int, method: str, *args):
    async def call():
        async with Client(f"http://127.0.0.1:{port}") as client:
            return await getattr(client, method)(*args)
    return asyncio.run(call())


HEADLESS = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "default"},
            "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"name": "pg", "port": 5432}]}}
SLICE = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "db-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "db"}},
         "addressType": "IPv4",
         "endpoints": [{"addresses": ["10.244.1.7"], "hostname": "db-0", "conditions": {"ready": True}}],
         "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]}
WEB = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
       "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]}}


def test_live_zone_follows_the_api_server(apiserver_port):
    port, start_apiserver = apiserver_port
    with ServerProcess("--server", f"http://127.0.0.1:{port}") as dns:
        # before the first sync: SERVFAIL for cluster names (never NXDOMAIN), and not ready
        assert dig(dns.port, "kubernetes.default.svc.cluster.local").status == "SERVFAIL"
        assert ready_status(dns.health_port) == 503
        start_apiserver()
        assert poll(lambda: dig(dns.port, "kubernetes.default.svc.cluster.local").records() ==
                    ["kubernetes.default.svc.cluster.local. 5 IN A 10.96.0.1"])
        assert ready_status(dns.health_port) == 200

        created = api(port, "create", WEB)
        ip = created["spec"]["clusterIP"]
        assert poll(lambda: dig(dns.port, "web.default.svc.cluster.local").records() ==
                    [f"web.default.svc.cluster.local. 5 IN A {ip}"])
        api(port, "delete", "Service", "web", "default")
        deleted_at = time.monotonic()
        assert poll(lambda: dig(dns.port, "web.default.svc.cluster.local").status == "NXDOMAIN")
        vanished_after = time.monotonic() - deleted_at
        print(f"deleted Service NXDOMAIN after {vanished_after:.3f}s")
        assert vanished_after < 5, "a deleted Service should vanish from DNS at once"

        api(port, "create", HEADLESS)
        assert dig(dns.port, "db.default.svc.cluster.local").status == "NXDOMAIN"  # no endpoints yet
        api(port, "create", SLICE)
        assert poll(lambda: dig(dns.port, "db.default.svc.cluster.local").records() ==
                    ["db.default.svc.cluster.local. 5 IN A 10.244.1.7"])
        srv = dig(dns.port, "_pg._tcp.db.default.svc.cluster.local", "SRV")
        assert srv.records() == ["_pg._tcp.db.default.svc.cluster.local. 5 IN SRV 0 100 5432 "
                                 "db-0.db.default.svc.cluster.local."]
        assert dig(dns.port, "-x", "10.244.1.7").records() == [
            "7.1.244.10.in-addr.arpa. 5 IN PTR db-0.db.default.svc.cluster.local."]
