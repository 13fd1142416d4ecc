"""`kubectl logs`: the pure parts (which container, which lines, where the agent is), the agent's
/containerLogs endpoint, and pods/log through a real API server to a real agent endpoint."""
from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from netplane import agent as agent_mod
from netplane import podlogs
from netplane.agent import ContainerRecord
from netplane.client import Client
from netplane.podlogs import LogError, LogQuery
from tests.unit.test_apiserver import RunningAPIServer


def pod(name="p", containers=("app",), node="n1"):
    return {"metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": node, "containers": [{"name": c, "image": "netplane/echo"} for c in containers]}}


# ------------------------------------------------------------------------------ pure

@pytest.mark.parametrize("data,lines,expected", [
    (b"a\nb\nc\n", 2, b"b\nc\n"), (b"a\nb\nc", 2, b"b\nc"), (b"a\nb\n", 5, b"a\nb\n"), (b"a\n", 0, b""),
    (b"", 3, b""), (b"only", 1, b"only")])
def test_tail_keeps_the_last_lines(data, lines, expected):
    assert podlogs.tail(data, lines) == expected


def test_the_container_is_the_one_named_or_the_only_one():
    assert podlogs.container_of(pod(), None) == "app"
    assert podlogs.container_of(pod(containers=("a", "b")), "b") == "b"
    with pytest.raises(LogError, match=r"a container name must be specified for pod p, choose one of: \[a b\]"):
        podlogs.container_of(pod(containers=("a", "b")), None)
    with pytest.raises(LogError, match='container "x" in pod "p" is not valid'):
        podlogs.container_of(pod(), "x")


@pytest.mark.parametrize("query,message", [({"tailLines": "x"}, "tailLines: invalid value 'x'"),
                                           ({"tailLines": "-1"}, "must be greater than or equal to 0"),
                                           ({"limitBytes": "0"}, "limitBytes: invalid value 0")])
def test_bad_queries_are_refused_naming_the_parameter(query, message):
    with pytest.raises(LogError, match=message) as err:
        LogQuery.parse(query)
    assert err.value.status == 400


def test_the_agent_is_found_from_its_node():
    node = {"metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "192.168.56.11"}],
                                                   "daemonEndpoints": {"kubeletEndpoint": {"Port": 10248}}}}
    assert podlogs.agent_url(node, "/containerLogs/ns/p/c") == "http://192.168.56.11:10248/containerLogs/ns/p/c"
    del node["status"]["daemonEndpoints"]
    with pytest.raises(LogError, match="node n1 publishes no address and port for its agent") as err:
        podlogs.agent_url(node, "/containerLogs/ns/p/c")
    assert err.value.status == 503


def test_a_long_log_is_tailed_from_its_end_and_limited(tmp_path):
    path = tmp_path / "c.log"
    path.write_bytes(b"".join(b"line %d\n" % i for i in range(50_000)))   # several read-back blocks
    data, offset = podlogs.read_log(str(path), LogQuery(tail_lines=3))
    assert data == b"line 49997\nline 49998\nline 49999\n" and offset == path.stat().st_size
    assert podlogs.read_log(str(path), LogQuery(limit_bytes=7))[0] == b"line 0\n"
    assert podlogs.read_log(str(tmp_path / "none.log"), LogQuery()) == (b"", 0)


# ------------------------------------------------------------------------------ the agent's endpoint

def fake_agent(tmp_path, state="running"):
    """Enough of an Agent for Agent.log_file: one pod p with container app, whose log is in tmp_path."""
    record = ContainerRecord("app", "netplane/echo")
    if state == "running":
        record.set_running("2026-12-01T00:00:00Z")
    worker = SimpleNamespace(ref=SimpleNamespace(namespace="default", name="p"), containers=[record], dir=tmp_path,
                             ephemeral={})
    fake = SimpleNamespace(workers={"uid": worker}, config=SimpleNamespace(node_name="n1"), record=record,
                           log_rotations={})
    for method in ("_worker", "_started_container", "log_file", "exec_target", "attach_target", "port_forward_target"):
        setattr(fake, method, getattr(agent_mod.Agent, method).__get__(fake))
    return fake


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def serve_agent(agent) -> tuple[web.AppRunner, int]:
    app = web.Application()
    agent_mod.add_pod_routes(app, lambda: agent)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def agent_on_api(url: str, agent, *pods: dict) -> web.AppRunner:
    """The agent's endpoints on loopback, and its Node (and `pods`) in the API server at `url`, as a
    real agent publishes itself; the caller cleans the runner up."""
    runner, port = await serve_agent(agent)
    try:
        async with Client(url) as client:
            await node_with_agent(client, port, *pods)
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def fetch(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.read()


def test_agent_serves_a_containers_log_and_follows_it_until_it_stops(tmp_path):
    (tmp_path / "app.log").write_bytes(b"one\ntwo\nthree\n")
    agent = fake_agent(tmp_path)

    async def scenario():
        runner, port = await serve_agent(agent)
        base = f"http://127.0.0.1:{port}/containerLogs/default/p"
        try:
            tailed = await fetch(f"{base}/app?tailLines=1")
            errors = [await fetch(f"{base}/nope"), await fetch(f"http://127.0.0.1:{port}/containerLogs/default/q/app")]
            following = asyncio.ensure_future(fetch(f"{base}/app?follow=true"))
            await asyncio.sleep(0.3)
            with open(tmp_path / "app.log", "ab") as f:
                f.write(b"four\n")
            await asyncio.sleep(0.5)
            agent.record.set_terminated(0, "2026-12-01T00:00:01Z")   # the container stops: the stream ends
            return tailed, errors, await asyncio.wait_for(following, 5)
        finally:
            await runner.cleanup()

    tailed, errors, followed = asyncio.run(scenario())
    assert tailed == (200, b"three\n")
    assert errors[0] == (400, b'container "nope" in pod "p" is not valid')
    assert errors[1] == (404, b'pods "q" not found on node n1')
    assert followed == (200, b"one\ntwo\nthree\nfour\n")


def test_agent_refuses_a_container_that_never_started(tmp_path):
    agent = fake_agent(tmp_path, state="waiting")
    with pytest.raises(LogError, match='container "app" in pod "p" is waiting to start: ContainerCreating'):
        agent.log_file("default", "p", "app")


# ------------------------------------------------------------------------------ through the API server

async def node_with_agent(client, port: int, *pods: dict) -> None:
    """Node n1, its agent at 127.0.0.1:`port` (as an agent publishes it), and `pods`."""
    await client.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})
    node = await client.get("Node", "n1")
    node["status"] = {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                      "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}
    await client.update(node, "status")
    for one in pods:
        await client.create({"apiVersion": "v1", "kind": "Pod", **one})


def test_pods_log_goes_through_the_api_server_to_the_nodes_agent(tmp_path):
    (tmp_path / "app.log").write_bytes(b"started\nserving\n")
    agent = fake_agent(tmp_path)

    async def scenario(url: str):
        runner = await agent_on_api(url, agent, pod(), pod("two", ("a", "b")), pod("unbound", node=""))
        try:
            base = f"{url}/api/v1/namespaces/default/pods"
            answers = [await fetch(f"{base}/p/log"), await fetch(f"{base}/p/log?tailLines=1&container=app"),
                       await fetch(f"{base}/two/log"), await fetch(f"{base}/unbound/log"),
                       await fetch(f"{base}/p/log?previous=true")]
            (tmp_path / "app.previous.log").write_bytes(b"crashed\n")   # what a restart leaves (start_new_run)
            answers.append(await fetch(f"{base}/p/log?previous=true"))
            await runner.cleanup()   # the agent stops answering
            answers.append(await fetch(f"{base}/p/log"))
            return answers
        finally:
            await runner.cleanup()

    with RunningAPIServer(str(tmp_path / "api.db")) as api:
        answers = asyncio.run(scenario(api.url))
    assert answers[0] == (200, b"started\nserving\n")
    assert answers[1] == (200, b"serving\n")
    assert answers[2][0] == 400 and b"a container name must be specified for pod two, choose one of: [a b]" in answers[2][1]
    assert answers[3][0] == 400 and b"pod unbound does not have a host assigned" in answers[3][1]
    assert answers[4][0] == 400 and b'previous terminated container \\"app\\" in pod \\"p\\" not found' in answers[4][1]
    assert answers[5] == (200, b"crashed\n")
    assert answers[6][0] == 500 and b"/containerLogs/default/p/app" in answers[6][1]   # the agent is gone


def test_a_restart_keeps_the_run_before_as_the_previous_log(tmp_path):
    log = tmp_path / "app.log"
    log.write_bytes(b"run 1\n")
    (tmp_path / "app.log.1").write_bytes(b"older\n")
    podlogs.start_new_run(str(log))
    assert not log.exists() and not (tmp_path / "app.log.1").exists()
    assert (tmp_path / "app.previous.log").read_bytes() == b"run 1\n"
    podlogs.start_new_run(str(log))   # nothing written since: the previous run's log stays
    assert (tmp_path / "app.previous.log").read_bytes() == b"run 1\n"
    assert LogQuery.parse({"previous": "true", "follow": "true"}) == LogQuery(previous=True)   # nothing to follow


# ------------------------------------------------------------------------------ rotation

def test_a_large_log_is_copied_aside_and_cut_while_its_process_keeps_writing(tmp_path):
    path = tmp_path / "app.log"
    writer = open(path, "ab", buffering=0)   # as the agent opens it for the container (O_APPEND)
    try:
        writer.write(b"x" * 2000 + b"\n")
        assert not podlogs.rotate_if_large(str(path), max_bytes=4096)
        writer.write(b"y" * 3000 + b"\n")
        assert podlogs.rotate_if_large(str(path), max_bytes=4096)
        writer.write(b"after\n")
    finally:
        writer.close()
    assert path.read_bytes() == b"after\n"   # the next line starts the file again, no hole before it
    assert (tmp_path / "app.log.1").read_bytes() == b"x" * 2000 + b"\n" + b"y" * 3000 + b"\n"
    assert not podlogs.rotate_if_large(str(tmp_path / "none.log"))


def test_following_goes_on_across_a_rotation(tmp_path):
    path = tmp_path / "app.log"
    path.write_bytes(b"old line\n")
    running, rotations = [True], [0]
    received: list[bytes] = []

    async def write(data: bytes) -> None:
        received.append(data)

    async def scenario():
        following = asyncio.ensure_future(podlogs.follow(str(path), path.stat().st_size, lambda: running[0],
                                                         write, None, lambda: rotations[0]))
        await asyncio.sleep(0.3)
        podlogs.rotate_if_large(str(path), max_bytes=1)
        rotations[0] += 1   # as the agent counts them
        with open(path, "ab") as f:
            f.write(b"new line\n")   # as long as what was read before the cut: only the count tells
        await asyncio.sleep(0.6)
        running[0] = False
        await asyncio.wait_for(following, 5)

    asyncio.run(scenario())
    assert b"".join(received) == b"new line\n"


def test_the_agent_rotates_the_logs_of_its_pods_and_counts_it(tmp_path, monkeypatch):
    monkeypatch.setattr(podlogs, "LOG_MAX_BYTES", 100)
    agent = fake_agent(tmp_path)
    agent.workers["uid"].label = "default/p"
    (tmp_path / "app.log").write_bytes(b"z" * 101)
    agent_mod.Agent.rotate_logs(agent)
    agent_mod.Agent.rotate_logs(agent)   # now small again: left alone
    assert (tmp_path / "app.log").read_bytes() == b"" and (tmp_path / "app.log.1").read_bytes() == b"z" * 101
    assert agent.log_rotations == {str(tmp_path / "app.log"): 1}
