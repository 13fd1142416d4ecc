"""`kubectl top`: /proc arithmetic (pure), a real busy process sampled, and metrics.k8s.io through a real API
server from agents' reports."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import aiohttp
from aiohttp import web

from netplane import podmetrics
from netplane.client import Client
from netplane.podmetrics import Sampler, Usage
from tests.unit.test_apiserver import RunningAPIServer
from tests.unit.test_podlogs import free_port


def test_proc_files_parse_as_the_kernel_writes_them():
    stat = "1234 (my (odd) name) S 1 1200 1200 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 1000 200"
    assert podmetrics.parse_stat(stat) == (1200, 300)   # process group, utime + stime
    assert podmetrics.parse_statm("5000 300 100 1 0 200 0") == 300 * podmetrics.PAGE_BYTES
    assert podmetrics.machine_busy_ticks("cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 1 2 3 4 5 6 7 8\n") == 161
    meminfo = "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    600 kB\n"
    assert podmetrics.machine_used_bytes(meminfo) == 400 * 1024
    assert podmetrics.nanocores(0, podmetrics.CLOCK_TICKS, 2.0) == 500_000_000   # a second of CPU in two
    assert Usage(1_500_000, 2048 * 1024).as_usage() == {"cpu": "1500000n", "memory": "2048Ki"}


def test_usage_comes_from_two_samples_and_leaves_with_the_container():
    sampler = Sampler()
    sampler.record(("uid", "app"), 0, 1 << 20, now=10.0)
    assert sampler.latest == {}                                   # one sample: no rate yet
    sampler.record(("uid", "app"), podmetrics.CLOCK_TICKS, 2 << 20, now=12.0)
    assert sampler.latest[("uid", "app")] == Usage(500_000_000, 2 << 20) and sampler.window == 2.0
    sampler.forget_except(set())
    assert sampler.latest == {} and sampler.previous == {}


def test_a_busy_process_group_is_measured_near_one_core():
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    try:
        sampler = Sampler()
        sampler.sample({"burner": burner.pid})
        time.sleep(1.0)
        sampler.sample({"burner": burner.pid})
    finally:
        burner.kill()
        burner.wait()
    usage = sampler.latest["burner"]
    assert 0.5e9 < usage.cpu_nanocores < 1.2e9 and usage.memory_bytes > 1 << 20
    assert "machine" in sampler.latest


def test_kubectl_top_reads_metrics_k8s_io_from_every_nodes_agent(tmp_path):
    report = {"timestamp": "2026-12-01T00:00:00Z", "window": 5.0,
              "node": {"cpu": "250000000n", "memory": "1048576Ki"},
              "pods": [{"namespace": "default", "name": "web", "containers": [{"name": "app", "usage": {
                  "cpu": "1000000n", "memory": "2048Ki"}}]},
                       {"namespace": "default", "name": "db", "containers": [{"name": "db", "usage": {
                           "cpu": "5n", "memory": "1Ki"}}]},
                       {"namespace": "other", "name": "web", "containers": []}]}

    async def scenario(url: str):
        async def stats(_request):
            return web.json_response(report)
        app = web.Application()
        app.router.add_get("/stats/resource", stats)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with Client(url) as client:
                for name, agent_port in (("n1", port), ("gone", free_port())):   # gone: its agent does not answer
                    await client.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
                    node = await client.get("Node", name)
                    node["status"] = {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                                      "daemonEndpoints": {"kubeletEndpoint": {"Port": agent_port}}}
                    await client.update(node, "status")
                for name, labels in (("web", {"app": "web"}), ("db", {"app": "db"})):
                    await client.create({"apiVersion": "v1", "kind": "Pod",
                                         "metadata": {"name": name, "namespace": "default", "labels": labels},
                                         "spec": {"containers": [{"name": "c", "image": "netplane/echo"}]}})
            base = f"{url}/apis/metrics.k8s.io/v1beta1"
            async with aiohttp.ClientSession() as session:
                async def get(path):
                    async with session.get(base + path) as r:
                        return r.status, await r.json()
                return (await get("/nodes"), await get("/namespaces/default/pods?labelSelector=app%3Dweb"),
                        await get("/pods"), await get("/namespaces/default/pods/nosuch"), await get("/nodes/n1"),
                        await get(""))
        finally:
            await runner.cleanup()

    with RunningAPIServer(str(tmp_path / "api.db")) as api:
        nodes, selected, everywhere, missing, one, discovery = asyncio.run(scenario(api.url))
    assert nodes[0] == 200 and [m["metadata"]["name"] for m in nodes[1]["items"]] == ["n1"]
    assert nodes[1]["items"][0]["usage"] == {"cpu": "250000000n", "memory": "1048576Ki"}
    assert nodes[1]["items"][0]["window"] == "5s"
    assert [(m["metadata"]["name"], m["containers"][0]["usage"]["cpu"]) for m in selected[1]["items"]] == [("web", "1000000n")]
    assert [m["metadata"]["name"] for m in everywhere[1]["items"]] == ["db", "web"]   # pods the API knows, with containers
    assert missing[0] == 404 and one[1]["kind"] == "NodeMetrics"
    assert {(r["name"], tuple(r["verbs"])) for r in discovery[1]["resources"]} == {("nodes", ("get", "list")),
                                                                                 ("pods", ("get", "list"))}
