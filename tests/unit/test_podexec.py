"""`kubectl exec`: the channel protocol (pure), and a command run through a real API server and a real
agent endpoint over WebSockets, as kubectl speaks to them (streams, exit codes, stdin and its close,
a terminal, the older v4 protocol, refusals)."""
from __future__ import annotations

import asyncio
import json
import os
from types import SimpleNamespace

import aiohttp
import pytest
from multidict import MultiDict

from netplane import podexec, runtime
from netplane.podexec import ExecError, ExecRequest
from tests.unit.test_apiserver import RunningAPIServer
from tests.unit.test_podlogs import agent_on_api, fake_agent, pod


def test_requests_name_their_command_and_streams():
    request = ExecRequest.parse(MultiDict([("command", "sh"), ("command", "-c"), ("command", "echo hi"),
                                           ("stdin", "true"), ("tty", "true"), ("stderr", "true")]))
    assert request.command == ("sh", "-c", "echo hi") and request.stdin and request.tty
    assert not request.stderr   # a terminal has one output stream
    with pytest.raises(ExecError, match="at least one command"):
        ExecRequest.parse(MultiDict())
    with pytest.raises(ExecError, match="at least 1 of stdin, stdout, stderr"):
        ExecRequest.parse(MultiDict([("command", "ls"), ("stdout", "false"), ("stderr", "false")]))


def test_the_best_protocol_both_speak_is_chosen():
    assert podexec.choose_protocol("v5.channel.k8s.io, v4.channel.k8s.io, channel.k8s.io") == "v5.channel.k8s.io"
    assert podexec.choose_protocol("v4.channel.k8s.io,v3.channel.k8s.io") == "v4.channel.k8s.io"
    assert podexec.choose_protocol("channel.k8s.io") is None


def test_outcomes_are_statuses_as_kubectl_reads_them():
    assert json.loads(podexec.outcome(0, ("ls",))[1:]) == {"metadata": {}, "status": "Success"}
    failed = json.loads(podexec.outcome(3, ("sh", "-c", "exit 3"))[1:])
    assert failed["reason"] == "NonZeroExitCode" and failed["details"]["causes"] == [{"reason": "ExitCode",
                                                                                       "message": "3"}]
    assert podexec.outcome(0, ("ls",))[0] == podexec.ERROR


# ------------------------------------------------------------------------------ through the API server

async def exec_over(url: str, command: list[str], stdin: bytes | None = None, tty: bool = False,
                    protocol: str = "v5.channel.k8s.io") -> tuple[bytes, bytes, dict]:
    """As kubectl does: (stdout, stderr, the final status)."""
    params = [("command", c) for c in command] + [("stdin", "true" if stdin is not None else "false"),
                                                  ("stdout", "true"), ("stderr", "false" if tty else "true"),
                                                  ("tty", "true" if tty else "false")]
    out, err, status = b"", b"", None
    async with aiohttp.ClientSession() as session, session.ws_connect(url, protocols=[protocol], params=params) as ws:
        if stdin is not None:
            await ws.send_bytes(bytes([podexec.STDIN]) + stdin)
            await ws.send_bytes(bytes([podexec.CLOSE, podexec.STDIN]))
        async for message in ws:
            channel, data = message.data[0], message.data[1:]
            if channel == podexec.STDOUT:
                out += data
            elif channel == podexec.STDERR:
                err += data
            elif channel == podexec.ERROR:
                status = json.loads(data)
    return out, err, status


def on_uvloop(coro):
    """As the agent runs (uvloop starts children its own way: a terminal must work there)."""
    import uvloop
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def gone_within(pid: int, seconds: float) -> bool:
    deadline = asyncio.get_running_loop().time() + seconds
    while os.path.exists(f"/proc/{pid}") and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    return not os.path.exists(f"/proc/{pid}")


def exec_ready_agent(tmp_path, monkeypatch):
    """The fake agent of test_podlogs with its pod's sandbox ready; commands run without a netns."""
    monkeypatch.setattr(runtime, "process_argv", lambda netns, hostname, argv: argv)
    agent = fake_agent(tmp_path)
    worker = agent.workers["uid"]
    worker.sandbox, worker.ref.netns, worker.ref.hostname, worker.label = SimpleNamespace(ready=True), "x", "p", "default/p"
    return agent, worker


def test_exec_runs_through_the_api_server_on_the_pods_agent(tmp_path, monkeypatch):
    agent, worker = exec_ready_agent(tmp_path, monkeypatch)

    async def scenario(url: str):
        runner = await agent_on_api(url, agent, pod())
        try:
            exec_url = f"{url}/api/v1/namespaces/default/pods/p/exec"
            results = {
                "streams": await exec_over(exec_url, ["sh", "-c", "echo out; echo err >&2; exit 3"]),
                "stdin": await exec_over(exec_url, ["cat"], stdin=b"typed\n"),
                "tty": await exec_over(exec_url, ["sh", "-c", "tty >/dev/null && echo on a terminal"], tty=True),
                "v4": await exec_over(exec_url, ["echo", "old"], protocol="v4.channel.k8s.io"),
            }
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(exec_url, protocols=["v5.channel.k8s.io"],
                                              params=[("command", "sh"), ("command", "-c"),
                                                      ("command", "echo $$; exec sleep 30")]) as ws:
                    pid = int((await ws.receive()).data[1:])
                results["hung_up"] = await gone_within(pid, 5)   # the client left: the command is stopped
                async with session.get(exec_url, params=[("command", "ls")]) as plain:   # no WebSocket
                    results["plain"] = (plain.status, await plain.text())
                agent.record.set_terminated(0, "2026-12-01T00:00:01Z")
                try:
                    await session.ws_connect(exec_url, protocols=["v5.channel.k8s.io"], params=[("command", "ls")])
                    results["stopped"] = None
                except aiohttp.WSServerHandshakeError as err:
                    results["stopped"] = err.status
            return results
        finally:
            await runner.cleanup()

    with RunningAPIServer(str(tmp_path / "api.db")) as api:
        results = on_uvloop(scenario(api.url))
    out, err, status = results["streams"]
    assert (out, err) == (b"out\n", b"err\n") and status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"][0]["message"] == "3"
    assert results["stdin"][0] == b"typed\n" and results["stdin"][2]["status"] == "Success"
    assert results["tty"][0] == b"on a terminal\r\n"   # a terminal's line ends
    assert results["v4"][0] == b"old\n" and results["v4"][2]["status"] == "Success"
    assert results["hung_up"]
    assert results["plain"][0] == 400 and "over a WebSocket" in results["plain"][1]
    assert results["stopped"] == 400   # the container is not running: refused before any upgrade


# ------------------------------------------------------------------------------ attach

async def attach_over(url: str, typed: bytes | None, tty: bool) -> tuple[bytes, dict]:
    params = [("stdin", "true" if typed is not None else "false"), ("stdout", "true"),
              ("stderr", "false" if tty else "true"), ("tty", "true" if tty else "false")]
    out, status = b"", None
    async with aiohttp.ClientSession() as session, session.ws_connect(url, protocols=["v5.channel.k8s.io"],
                                                                      params=params) as ws:
        if typed is not None:
            await ws.send_bytes(bytes([podexec.RESIZE]) + json.dumps({"Width": 100, "Height": 40}).encode())
            await ws.send_bytes(bytes([podexec.STDIN]) + typed)
        async for message in ws:
            if message.data[0] == podexec.STDOUT:
                out += message.data[1:]
            elif message.data[0] == podexec.ERROR:
                status = json.loads(message.data[1:])
    return out, status


def test_attach_reaches_a_containers_terminal_or_its_output(tmp_path, monkeypatch):
    agent, worker = exec_ready_agent(tmp_path, monkeypatch)
    env = {"PATH": "/usr/bin:/bin"}
    log_path = str(tmp_path / "app.log")

    async def scenario(url: str):
        runner = await agent_on_api(url, agent, pod())
        try:
            attach_url = f"{url}/api/v1/namespaces/default/pods/p/attach"
            # a container with stdin and tty: its terminal, both ways
            process = await runtime.start_process(["sh", "-c", 'read line; stty size; echo "got:$line"; exit 2'],
                                                  env, log_path, terminal=True)
            terminal = podexec.Terminal(process.terminal, log_path)
            worker.processes, worker.terminals = {"app": process}, {"app": terminal}
            async with aiohttp.ClientSession() as session:   # one that comes and goes (kubectl detached)
                async with session.ws_connect(attach_url, protocols=["v5.channel.k8s.io"],
                                              params=[("stdin", "true"), ("tty", "true")]):
                    for _ in range(50):
                        if terminal.watchers:
                            break
                        await asyncio.sleep(0.02)
            for _ in range(50):
                if not terminal.watchers:
                    break
                await asyncio.sleep(0.02)
            left_cleanly = not terminal.watchers and process.popen.poll() is None
            on_terminal = await attach_over(attach_url, b"hello\n", tty=True)
            # a plain container: what it writes from now on
            process = await runtime.start_process(["sh", "-c", "sleep 0.5; echo late; sleep 0.3"], env, log_path)
            worker.processes, worker.terminals = {"app": process}, {}
            agent.record.set_running("2026-12-01T00:00:00Z")
            plain = asyncio.ensure_future(attach_over(attach_url, None, tty=False))
            await process.wait()
            agent.record.set_terminated(0, "2026-12-01T00:00:01Z")
            return left_cleanly, on_terminal, await asyncio.wait_for(plain, 10)
        finally:
            await runner.cleanup()

    with RunningAPIServer(str(tmp_path / "api.db")) as api:
        left_cleanly, (out, status), (plain_out, plain_status) = on_uvloop(scenario(api.url))
    assert left_cleanly   # a client that leaves ends its attach; the container goes on
    assert b"40 100" in out and b"got:hello" in out, out   # typed, resized, answered
    assert status["details"]["causes"][0]["message"] == "2"
    assert b"got:hello" in (tmp_path / "app.log").read_bytes()   # a terminal's output is logged too
    assert plain_out == b"late\n" and plain_status == {"metadata": {}, "status": "Success"}
