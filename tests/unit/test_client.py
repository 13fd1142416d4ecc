"""The watch cache against a small fake API server on loopback: list, watch, resume, relist on 410."""
import asyncio
import json

import pytest
from aiohttp import web

from netplane.client import APIError, Client, CoalescingRunner, FileView, WatchView, resolve_server


def svc(name, rv):
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "resourceVersion": str(rv)}}


class FakeServer:
    """Serves /api/v1/services: a list at rv 5, then watch streams scripted per call."""

    def __init__(self):
        self.items = [svc("a", 3)]
        self.watch_scripts = []   # each: list of events (dicts) or "gone"
        self.watch_calls = []
        self.list_calls = 0

    async def handle(self, request):
        if request.query.get("watch") == "true":
            self.watch_calls.append(request.query.get("resourceVersion"))
            script = self.watch_scripts.pop(0) if self.watch_scripts else []
            resp = web.StreamResponse()
            await resp.prepare(request)
            if script == "gone":
                status = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
                await resp.write(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
                return resp
            for event in script:
                await resp.write(json.dumps(event).encode() + b"\n")
            if not self.watch_scripts:
                await asyncio.sleep(30)  # hold the last stream open
            return resp
        self.list_calls += 1
        return web.json_response({"kind": "ServiceList", "apiVersion": "v1",
                                  "metadata": {"resourceVersion": "5"}, "items": self.items})




async def wait_for(predicate, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def run(coro):
    return asyncio.run(coro)


def test_watch_view_lists_then_applies_events_and_resumes_from_last_revision():
    async def scenario():
        fake = FakeServer()
        fake.watch_scripts = [
            [{"type": "ADDED", "object": svc("b", 6)}],             # stream ends -> resume from 6
            [{"type": "DELETED", "object": svc("a", 7)}],
        ]
        url, cleanup = await serve(fake)
        client = Client(url)
        view = WatchView(client, ["Service"])
        changes = []
        view.add_listener(lambda: changes.append(sorted(o["metadata"]["name"] for o in view.list("Service"))))
        await view.start()
        await view.wait_synced()
        await wait_for(lambda: changes and changes[-1] == ["b"])
        assert changes[0] == ["a"]
        assert fake.watch_calls[:2] == ["5", "6"]
        assert fake.list_calls == 1
        await view.stop()
        await client.close()
        await cleanup()
    run(scenario())


def test_informer_relists_after_410_gone():
    async def scenario():
        fake = FakeServer()
        fake.watch_scripts = ["gone", []]
        url, cleanup = await serve(fake)
        client = Client(url)
        view = WatchView(client, ["Service"])
        await view.start()
        await wait_for(lambda: fake.list_calls >= 2)
        assert view.get("Service", "default", "a") is not None
        await view.stop()
        await client.close()
        await cleanup()
    run(scenario())


def test_get_missing_raises_status_reason():
    async def scenario():
        url, cleanup = await serve(FakeServer())
        async with Client(url) as client:
            with pytest.raises(APIError) as err:
                await client.get("Service", "missing", "default")
            assert err.value.status == 404 and err.value.reason == "NotFound"
        await cleanup()
    run(scenario())


async def not_found(_request):
    return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound",
                              "message": "not found"}, status=404)


async def serve(fake):
    app = web.Application()
    app.router.add_get("/api/v1/services", fake.handle)
    app.router.add_get("/api/v1/namespaces/default/services/missing", not_found)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}", runner.cleanup


def test_coalescing_runner_folds_a_burst_into_few_runs():
    async def scenario():
        runs = []

        async def sync():
            runs.append(1)

        runner = CoalescingRunner(sync, min_interval=0.05)
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        for _ in range(100):
            runner.request()
            await asyncio.sleep(0)
        await asyncio.sleep(0.2)
        stop.set()
        await task
        assert 1 <= len(runs) <= 3
    run(scenario())


def test_file_view_and_resolve_server(tmp_path, monkeypatch):
    view = FileView([svc("a", 1), {"kind": "Pod", "metadata": {"name": "p", "namespace": "x"}}])
    assert [o["metadata"]["name"] for o in view.list("Service")] == ["a"]
    assert view.get("Pod", "x", "p") is not None and view.list("Ingress") == []
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\ncurrent-context: lab\n"
                          "clusters: [{name: lab, cluster: {server: 'http://192.168.56.10:6443'}}]\n"
                          "contexts: [{name: lab, context: {cluster: lab, user: admin}}]\n")
    monkeypatch.delenv("NETPLANE_SERVER", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    assert resolve_server(None, str(kubeconfig)) == "http://192.168.56.10:6443"
    assert resolve_server("http://x:1/") == "http://x:1"
    with pytest.raises(APIError):
        resolve_server(None, str(tmp_path / "nope"))


def test_unseen_writes_last_until_shown_gone_or_expired():
    from netplane.client import UnseenWrites
    writes = UnseenWrites(ttl=10.0)
    writes.note("a", "10.244.0.0/24", now=0.0)
    writes.note("b", "10.244.1.0/24", now=0.0)
    writes.note("c", "10.244.2.0/24", now=0.0)
    assert writes.unseen({"a": [None], "b": [None], "c": [None]}, now=1.0) == {
        "a": "10.244.0.0/24", "b": "10.244.1.0/24", "c": "10.244.2.0/24"}
    assert writes.unseen({"a": ["10.244.0.0/24"], "b": [None]}, now=2.0) == {"b": "10.244.1.0/24"}  # a shown, c gone
    assert writes.unseen({"b": [None]}, now=11.0) == {}   # expired
    writes.note("d", "x", now=0.0)
    writes.forget("d")
    assert writes.unseen({"d": []}, now=0.0) == {}
