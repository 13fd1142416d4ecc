"""Live mode: `netplane ingress serve --server URL` against the real `netplane apiserver` on 127.0.0.1.
Not ready until the first table; routes follow Ingresses and EndpointSlices within a second; 50
keep-alive clients see no failed request while routes and endpoints change 20 times."""
from __future__ import annotations

import asyncio
import http.client
import subprocess
import sys
import threading
import time

import pytest

from netplane.client import Client
from tests.unit.test_ingress_http import World, free_port, get, pod_of, wait_port


def api(port: int, method: str, *args, **kwargs):
    async def call():
        async with Client(f"http://127.0.0.1:{port}") as client:
            return await getattr(client, method)(*args, **kwargs)
    return asyncio.run(call())


def poll(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def ingress_object(paths):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": "live", "namespace": "default"},
            "spec": {"rules": [{"host": "live.test", "http": {"paths": [
                {"path": p, "pathType": "Prefix", "backend": {"service": {"name": s, "port": {"number": 80}}}}
                for p, s in paths]}}]}}


def service_object(name):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}


def slice_object(name, port):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{name}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]}


@pytest.fixture
def live(tmp_path):
    world = World(tmp_path)
    try:
        world.api_port = free_port()
        api_proc = subprocess.Popen([sys.executable, "-m", "netplane", "apiserver", "--listen",
                                     f"127.0.0.1:{world.api_port}", "--db", str(tmp_path / "store.db"),
                                     "--advertise-address", "192.0.2.10"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        world.procs.append(api_proc)
        wait_port(world.api_port, api_proc)
        world.echo_a, world.echo_b = world.echo("pod-a"), world.echo("pod-b")
        world.port, world.health = free_port(), free_port()
        log = open(tmp_path / "ingress.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "netplane", "ingress", "serve", "--server",
                                 f"http://127.0.0.1:{world.api_port}", "--listen", f"127.0.0.1:{world.port}",
                                 "--health-listen", f"127.0.0.1:{world.health}", "--workers", "1"],
                                stdout=log, stderr=log)
        world.procs.append(proc)
        wait_port(world.health, proc)
        yield world
    finally:
        world.close()


def test_ready_after_sync_and_routes_follow_the_api(live):
    assert poll(lambda: get(live, "x", "/healthz", port=live.health)[0] == 200)
    for obj in (service_object("a"), slice_object("a", live.echo_a), ingress_object([("/", "a")])):
        api(live.api_port, "create", obj)
    assert poll(lambda: get(live, "live.test")[0] == 200)
    assert pod_of(get(live, "live.test")[1]) == "pod-a"
    api(live.api_port, "delete", "Ingress", "live", "default")
    assert poll(lambda: get(live, "live.test")[0] == 404)


def test_fifty_keep_alive_clients_see_no_failure_while_routes_and_endpoints_change(live):
    assert poll(lambda: get(live, "x", "/healthz", port=live.health)[0] == 200)
    for obj in (service_object("a"), slice_object("a", live.echo_a), service_object("b"),
                slice_object("b", live.echo_b), ingress_object([("/", "a")])):
        api(live.api_port, "create", obj)
    assert poll(lambda: get(live, "live.test")[0] == 200)

    stop = threading.Event()
    results: list[tuple[int, str]] = []
    errors: list[str] = []

    def client(i: int):
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
        path = "/x/1" if i % 2 else "/"
        try:
            while not stop.is_set():
                conn.request("GET", path, headers={"Host": "live.test"})
                resp = conn.getresponse()
                body = resp.read().decode()
                results.append((resp.status, pod_of(body) if resp.status == 200 else body))
        except Exception as err:   # a dropped connection is a failure too
            errors.append(f"client {i}: {err!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    latencies = []
    try:
        for change in range(20):
            if change % 2 == 0:   # endpoints: service a's slice moves to the other backend
                port = live.echo_b if change % 4 == 0 else live.echo_a
                expected = "pod-b" if port == live.echo_b else "pod-a"
                api(live.api_port, "patch", "EndpointSlice", "a-1",
                    {"ports": [{"name": "http", "port": port, "protocol": "TCP"}]}, "default")
                check = lambda: pod_of(get(live, "live.test", "/")[1]) == expected   # noqa: E731
            else:                 # routes: /x goes to b, then back to a
                target = "b" if change % 4 == 1 else "a"
                api(live.api_port, "patch", "Ingress", "live",
                    {"spec": {"rules": ingress_object([("/", "a"), ("/x", target)])["spec"]["rules"]}}, "default")
                expected = "pod-b" if target == "b" else pod_of(get(live, "live.test", "/")[1])
                check = lambda: pod_of(get(live, "live.test", "/x/check")[1]) == expected   # noqa: E731
            started = time.monotonic()
            assert poll(check, timeout=5), f"change {change} did not take effect"
            latencies.append(time.monotonic() - started)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert not errors, errors[:5]
    failed = [r for r in results if r[0] != 200]
    assert len(results) > 500 and not failed, (len(results), failed[:5])
    print(f"{len(results)} requests, 0 failed; change latencies (s): {[round(x, 3) for x in latencies]}")
    assert max(latencies) < 1.0, latencies
    assert {pod for _, pod in results} == {"pod-a", "pod-b"}
