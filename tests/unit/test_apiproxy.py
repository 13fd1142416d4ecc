"""pods/proxy and services/proxy: where a name and port lead (pure), and requests relayed through a real
API server to a server on loopback standing in for the pod."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from netplane import apiproxy
from netplane.apiproxy import ProxyError, Target
from netplane.client import Client
from tests.unit.test_apiserver import RunningAPIServer
from tests.unit.test_podlogs import free_port


def pod(ip="10.244.1.5", ports=({"name": "http", "containerPort": 8080},)):
    return {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "ports": list(ports)}]},
            "status": {"podIP": ip} if ip else {}}


@pytest.mark.parametrize("text,target", [
    ("web", Target("http", "web", "")), ("web:80", Target("http", "web", "80")),
    ("https:web:443", Target("https", "web", "443")), ("https:web", Target("https", "web", "")),
    ("web:http", Target("http", "web", "http"))])
def test_targets_parse_as_the_kube_apiserver_reads_them(text, target):
    assert apiproxy.parse_target(text) == target


def test_a_bad_target_is_named():
    with pytest.raises(ProxyError, match="expected \\[scheme:\\]name\\[:port\\]"):
        apiproxy.parse_target("a:b:c:d")


def test_a_pods_port_is_a_number_a_name_or_its_first():
    assert apiproxy.pod_address(pod(), "9090") == ("10.244.1.5", 9090)
    assert apiproxy.pod_address(pod(), "http") == ("10.244.1.5", 8080)
    assert apiproxy.pod_address(pod(), "") == ("10.244.1.5", 8080)
    assert apiproxy.pod_address(pod(ports=()), "") == ("10.244.1.5", 80)
    with pytest.raises(ProxyError, match='no container port named "grpc"'):
        apiproxy.pod_address(pod(), "grpc")
    with pytest.raises(ProxyError, match="has no IP address yet") as caught:
        apiproxy.pod_address(pod(ip=None), "")
    assert caught.value.status == 503


def test_a_services_port_leads_to_its_ready_endpoints_target_port():
    service = {"metadata": {"name": "web"}, "spec": {"ports": [{"name": "http", "port": 80}, {"name": "m", "port": 9}]}}
    slices = [{"ports": [{"name": "http", "port": 8080}, {"name": "m", "port": 9100}],
               "endpoints": [{"addresses": ["10.0.0.2"], "conditions": {"ready": True}},
                             {"addresses": ["10.0.0.3"], "conditions": {"ready": False}},
                             {"addresses": ["10.0.0.1"]}]}]
    assert apiproxy.service_addresses(service, slices, "") == [("10.0.0.1", 8080), ("10.0.0.2", 8080)]
    assert apiproxy.service_addresses(service, slices, "9") == [("10.0.0.1", 9100), ("10.0.0.2", 9100)]
    assert apiproxy.service_addresses(service, slices, "m") == [("10.0.0.1", 9100), ("10.0.0.2", 9100)]
    with pytest.raises(ProxyError, match='no endpoints available for service "web"'):
        apiproxy.service_addresses(service, [], "http")
    with pytest.raises(ProxyError, match='"web:443"'):
        apiproxy.service_addresses(service, slices, "443")
    assert apiproxy.upstream_url("http", ("fd00::1", 80), "/a/", "x=1") == "http://[fd00::1]:80/a/?x=1"


async def backend() -> tuple[web.AppRunner, int, list]:
    """An HTTP server on loopback that says what it was asked."""
    seen = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"method": request.method, "path": request.rel_url.path_qs,
                                  "body": (await request.read()).decode()}, headers={"X-Backend": "yes"})
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port, seen


def test_requests_go_through_the_api_server_to_the_pod_and_the_service(tmp_path):
    async def scenario(url: str):
        runner, port, seen = await backend()
        closed = free_port()
        try:
            async with Client(url) as client:
                await client.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default"},
                                     "spec": {"containers": [{"name": "c", "image": "netplane/echo",
                                                              "ports": [{"name": "http", "containerPort": port}]}]}})
                created = await client.get("Pod", "p", "default")
                created["status"] = {"podIP": "127.0.0.1"}
                await client.update(created, "status")
                await client.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
                                     "spec": {"ports": [{"name": "http", "port": 80}]}})
                await client.create({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                                     "metadata": {"name": "web-1", "namespace": "default",
                                                  "labels": {"kubernetes.io/service-name": "web"}},
                                     "addressType": "IPv4", "ports": [{"name": "http", "port": port}],
                                     "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]})
            base = f"{url}/api/v1/namespaces/default"
            answers = {}
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{base}/pods/p:http/proxy/a/b/?x=1",
                                       headers={"X-Mine": "1", "Connection": "close, X-Drop", "X-Drop": "no"}) as r:
                    answers["pod"] = (r.status, await r.json(), r.headers.get("X-Backend"))
                async with session.post(f"{base}/services/web:80/proxy/submit", data=b"payload") as r:
                    answers["service"] = (r.status, await r.json())
                async with session.get(f"{base}/services/web/proxy") as r:
                    answers["bare"] = (await r.json())["path"]
                async with session.get(f"{base}/pods/p:{closed}/proxy/") as r:
                    answers["refused"] = (r.status, (await r.json())["message"])
                async with session.get(f"{base}/services/nosuch/proxy/") as r:
                    answers["missing"] = r.status
            return answers, seen, closed
        finally:
            await runner.cleanup()

    with RunningAPIServer(str(tmp_path / "api.db")) as api:
        answers, seen, closed = asyncio.run(scenario(api.url))
    status, body, backend_header = answers["pod"]
    assert status == 200 and body["method"] == "GET" and body["path"] == "/a/b/?x=1" and backend_header == "yes"
    assert seen[0].get("X-Mine") == "1" and "X-Drop" not in seen[0]   # hop-by-hop, as Connection names them
    assert answers["service"] == (200, {"method": "POST", "path": "/submit", "body": "payload"})
    assert answers["bare"] == "/"
    assert answers["refused"] == (503, f"error trying to reach service: dial tcp 127.0.0.1:{closed}: connect: "
                                       "connection refused")
    assert answers["missing"] == 404
