"""`kubectl port-forward`: SPDY/3.1 framing (pure), a Session against a server on loopback, and the whole
path (a real kubectl, the API server, the agent's endpoint) when kubectl is installed."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import zlib
from types import SimpleNamespace

import aiohttp
import pytest

from netplane import portforward
from netplane.client import Client
from netplane.portforward import FLAG_FIN, GOAWAY, PING, RST_STREAM, SYN_REPLY, Framer, ProtocolError, Session
from tests.unit.test_apiserver import RunningAPIServer
from tests.unit.test_podexec import on_uvloop
from tests.unit.test_podlogs import agent_on_api, fake_agent, free_port, node_with_agent, pod, serve_agent


def kubectl_streams(framer: Framer, request: str, port: str, first: int = 1) -> bytes:
    """What kubectl sends for one local connection: the error stream (closed at once), the data stream."""
    headers = {"streamtype": "error", "port": port, "requestid": request}
    return (framer.syn_stream(first, headers) + framer.data(first, b"", fin=True)
            + framer.syn_stream(first + 2, {**headers, "streamtype": "data"}))


# ------------------------------------------------------------------------------ framing (pure)

def test_the_dictionary_is_spdy3s():
    # zlib names a preset dictionary by its Adler-32; this is the id in kubectl's header blocks.
    assert len(portforward.DICTIONARY) == 1423 and zlib.adler32(portforward.DICTIONARY) == 0xE3C6A7C2


def test_frames_survive_a_round_trip_in_any_chunking():
    client, server = Framer(), Framer()
    wire = (kubectl_streams(client, "0", "8080") + client.data(3, b"GET / HTTP/1.0\r\n\r\n", fin=True)
            + client.ping(7) + client.control(4, b"\x00\x00\x00\x00"))   # SETTINGS: read past
    frames = [f for i in range(len(wire)) for f in server.feed(wire[i:i + 1])]   # one byte at a time
    assert [(f.kind, f.stream, f.fin) for f in frames] == [(1, 1, False), (0, 1, True), (1, 3, False), (0, 3, True),
                                                          (PING, 0, False), (4, 0, False)]
    assert frames[0].headers == {"streamtype": "error", "port": "8080", "requestid": "0"}
    assert frames[2].headers["streamtype"] == "data" and frames[3].data == b"GET / HTTP/1.0\r\n\r\n"
    assert frames[4].value == 7
    reply = client.feed(server.syn_reply(1) + server.rst_stream(5, 3) + server.goaway(3, 0))
    assert [(f.kind, f.stream, f.value) for f in reply] == [(SYN_REPLY, 1, 0), (RST_STREAM, 5, 3), (GOAWAY, 3, 0)]
    assert reply[0].headers == {}


@pytest.mark.parametrize("wire,match", [
    (b"\x80\x02\x00\x01\x00\x00\x00\x0a" + bytes(10), "SPDY version 2"),
    (Framer.control(1, b"\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00not zlib"), "does not decompress"),
    (Framer.control(3, b"\x00\x00\x00\x01"), "too short"),
    (Framer.control(6, b"\x00"), "PING of fewer than 4 bytes"),
])
def test_broken_framing_is_named(wire, match):
    with pytest.raises(ProtocolError, match=match):
        Framer().feed(wire)


def test_a_header_block_that_lies_about_its_headers_is_refused():
    framer = Framer()
    lying = framer._deflate.compress(b"\x00\x00\x00\x02\x00\x00\x00\x04port") + framer._deflate.flush(zlib.Z_SYNC_FLUSH)
    with pytest.raises(ProtocolError, match="ends inside a header"):
        Framer().feed(Framer.control(1, bytes(10) + lying))


@pytest.mark.parametrize("text,error", [("8080", None), ("65535", None), ("abc", "unable to parse 'abc' as a port"),
                                        ("0", "invalid port 0"), ("70000", "invalid port 70000"), (None, "unable")])
def test_ports(text, error):
    if error is None:
        assert portforward.parse_port(text) == int(text)
    else:
        with pytest.raises(ValueError, match=error):
            portforward.parse_port(text)


# ------------------------------------------------------------------------------ a session, a server on loopback

class Wire:
    """Both ends of a session's byte stream: the test writes as kubectl, reads what the agent sends."""

    def __init__(self):
        self.client = Framer()
        self.to_agent: asyncio.Queue = asyncio.Queue()
        self.from_agent = bytearray()
        self.frames: list = []
        self.changed = asyncio.Event()

    async def send(self, data: bytes) -> None:   # the agent's side
        self.frames += self.client.feed(data)
        self.changed.set()

    async def incoming(self):
        while (chunk := await self.to_agent.get()) is not None:
            yield chunk

    async def until(self, predicate, seconds: float = 5.0) -> list:
        async def wait():
            while not predicate(self.frames):
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(wait(), seconds)
        return self.frames


async def echo_server(closing: list | None = None):
    """127.0.0.1:port answering each connection with what it read, upper-cased, after the client's
    half-close; `closing` collects b"EOF" when a client's connection ends."""
    async def handle(reader, writer):
        data = await reader.read()
        if closing is not None:
            closing.append(b"EOF")
        writer.write(data.upper())
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def loopback(port_map: dict):
    """connect(port) to 127.0.0.1, with the test's ports standing in for the pod's."""
    async def connect(port: int):
        return await asyncio.open_connection("127.0.0.1", port_map.get(port, port))
    return connect


def stream_bytes(frames: list, stream: int) -> tuple[bytes, bool]:
    data = b"".join(f.data for f in frames if f.kind == 0 and f.stream == stream)
    return data, any(f.kind == 0 and f.stream == stream and f.fin for f in frames)


def test_a_connection_is_forwarded_both_ways_with_its_half_close():
    async def scenario():
        server, port = await echo_server()
        wire = Wire()
        session = Session(wire.send, loopback({8080: port}), "default/p")
        running = asyncio.ensure_future(session.run(wire.incoming()))
        # kubectl writes as soon as its data stream is answered: here, in the same chunk as the streams
        await wire.to_agent.put(kubectl_streams(wire.client, "0", "8080") + wire.client.data(3, b"hello", fin=True))
        frames = await wire.until(lambda fs: stream_bytes(fs, 1)[1] and stream_bytes(fs, 3)[1])
        await wire.to_agent.put(None)
        await running
        server.close()
        return frames, session.forwarded
    frames, forwarded = asyncio.run(scenario())
    assert [(f.kind, f.stream) for f in frames[:2]] == [(SYN_REPLY, 1), (SYN_REPLY, 3)]   # answered first
    assert stream_bytes(frames, 3) == (b"HELLO", True)    # the server saw kubectl's end of input
    assert stream_bytes(frames, 1) == (b"", True)         # nothing went wrong
    assert forwarded == 1


def test_why_a_connection_could_not_be_made_goes_on_the_error_stream():
    async def scenario():
        closed = free_port()   # nothing listens there
        wire = Wire()
        session = Session(wire.send, loopback({81: closed}), "default/p")
        running = asyncio.ensure_future(session.run(wire.incoming()))
        await wire.to_agent.put(kubectl_streams(wire.client, "0", "81") + kubectl_streams(wire.client, "1", "x", 5))
        frames = await wire.until(lambda fs: all(stream_bytes(fs, s)[1] for s in (1, 3, 5, 7)))
        await wire.to_agent.put(None)
        await running
        return frames
    frames = asyncio.run(scenario())
    refused, fin = stream_bytes(frames, 1)
    assert fin and refused.startswith(b"error forwarding port 81 to pod default/p: ") and b"refused" in refused
    assert stream_bytes(frames, 5)[0] == b"error forwarding port x to pod default/p: unable to parse 'x' as a port"
    assert stream_bytes(frames, 3) == (b"", True) and stream_bytes(frames, 7) == (b"", True)


def test_pings_are_answered_odd_streams_checked_and_a_broken_session_goes_away():
    async def scenario():
        wire = Wire()
        session = Session(wire.send, loopback({}), "default/p")
        running = asyncio.ensure_future(session.run(wire.incoming()))
        await wire.to_agent.put(wire.client.ping(1) + wire.client.syn_stream(2, {"streamtype": "data"})
                                + wire.client.syn_stream(9, {"streamtype": "other", "requestid": "0"})
                                + wire.client.data(11, b"stray"))
        await wire.until(lambda fs: len(fs) >= 4)
        await wire.to_agent.put(b"\x80\x02\x00\x01\x00\x00\x00\x00")   # SPDY/2
        with pytest.raises(ProtocolError):
            await running
        return wire.frames
    frames = asyncio.run(scenario())
    assert [(f.kind, f.stream, f.value) for f in frames] == [
        (PING, 0, 1),                 # echoed
        (RST_STREAM, 2, 1),           # even ids are the server's: PROTOCOL_ERROR
        (RST_STREAM, 9, 3),           # neither error nor data: REFUSED_STREAM
        (RST_STREAM, 11, 2),          # data on a stream never opened: INVALID_STREAM
        (GOAWAY, 9, 1)]               # then the broken frame: the session ends


def test_the_end_of_a_session_closes_its_pods_connections():
    async def scenario():
        closing: list = []
        server, port = await echo_server(closing)
        wire = Wire()
        running = asyncio.ensure_future(Session(wire.send, loopback({80: port}), "default/p").run(wire.incoming()))
        await wire.to_agent.put(kubectl_streams(wire.client, "0", "80") + wire.client.data(3, b"half"))
        await wire.until(lambda fs: len(fs) >= 2)
        await asyncio.sleep(0.1)
        await wire.to_agent.put(None)   # kubectl went away without closing its stream
        await running
        for _ in range(50):
            if closing:
                break
            await asyncio.sleep(0.02)
        server.close()
        return closing
    assert asyncio.run(scenario()) == [b"EOF"]


# ------------------------------------------------------------------------------ through the API server and the agent

def port_forward_agent(tmp_path):
    agent = fake_agent(tmp_path)
    worker = agent.workers["uid"]
    worker.sandbox, worker.ref.netns, worker.label = SimpleNamespace(ready=True), None, "default/p"   # our own netns
    return agent, worker


async def spdy_over_websocket(url: str, port: int, payload: bytes) -> tuple[bytes, bytes]:
    """As kubectl 1.31+ does: (what came back on the data stream, on the error stream)."""
    framer = Framer()
    frames: list = []
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(url, protocols=[portforward.PROTOCOL]) as ws:
        await ws.send_bytes(kubectl_streams(framer, "0", str(port)))
        await ws.send_bytes(framer.data(3, payload, fin=True))
        async for message in ws:
            frames += framer.feed(message.data)
            if stream_bytes(frames, 1)[1] and stream_bytes(frames, 3)[1]:
                break
    return stream_bytes(frames, 3)[0], stream_bytes(frames, 1)[0]


def test_port_forward_goes_through_the_api_server_to_the_pods_agent(tmp_path):
    agent, worker = port_forward_agent(tmp_path)

    async def scenario(url: str):
        server, echo_port = await echo_server()
        runner = await agent_on_api(url, agent, pod(), pod("unbound", node=""))
        try:
            base = f"{url}/api/v1/namespaces/default/pods"
            results = {"forwarded": await spdy_over_websocket(f"{base}/p/portforward", echo_port, b"through"),
                       "refused": await spdy_over_websocket(f"{base}/p/portforward", free_port(), b"")}
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{base}/p/portforward", headers={"X-Stream-Protocol-Version":
                                                                           "portforward.k8s.io"}) as spdy:
                    results["spdy"] = (spdy.status, await spdy.text())
                async with session.get(f"{base}/unbound/portforward") as unbound:
                    results["unbound"] = (unbound.status, await unbound.text())
                worker.sandbox = SimpleNamespace(ready=False)
                try:
                    await session.ws_connect(f"{base}/p/portforward", protocols=[portforward.PROTOCOL])
                except aiohttp.WSServerHandshakeError as err:
                    results["not_running"] = err.status
            return results
        finally:
            await runner.cleanup()
            server.close()

    with RunningAPIServer(str(tmp_path / "api.db")) as api:
        results = on_uvloop(scenario(api.url))
    assert results["forwarded"] == (b"THROUGH", b"")
    data, error = results["refused"]
    assert data == b"" and b"error forwarding port" in error and b"Connection refused" in error
    assert results["spdy"][0] == 400 and "over a WebSocket (kubectl 1.31 and later)" in results["spdy"][1]
    assert results["unbound"][0] == 400 and "does not have a host assigned" in results["unbound"][1]
    assert results["not_running"] == 400


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="no kubectl on this machine (the real client's part of the test)")
def test_a_real_kubectl_forwards_a_local_port_to_the_pod(tmp_path):
    agent, _ = port_forward_agent(tmp_path)

    async def scenario(url: str):
        server, echo_port = await echo_server()
        runner, port = await serve_agent(agent)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "t",
            "clusters": [{"name": "t", "cluster": {"server": url}}],
            "contexts": [{"name": "t", "context": {"cluster": "t", "user": "u"}}], "users": [{"name": "u", "user": {}}]}))
        kubectl = None
        try:
            async with Client(url) as client:
                await node_with_agent(client, port, pod())
                running = await client.get("Pod", "p", "default")
                running["status"] = {"phase": "Running"}   # kubectl forwards only to a running pod
                await client.update(running, "status")
            kubectl = await asyncio.create_subprocess_exec(
                KUBECTL, "--kubeconfig", str(kubeconfig), "port-forward", "pod/p", f":{echo_port}", "--address", "127.0.0.1",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "HOME": str(tmp_path)})
            line = (await asyncio.wait_for(kubectl.stdout.readline(), 20)).decode()
            local = int(line.split("127.0.0.1:")[1].split()[0])   # "Forwarding from 127.0.0.1:NNNNN -> PORT"
            answers = []
            for text in (b"first", b"second"):   # two connections through one session
                reader, writer = await asyncio.open_connection("127.0.0.1", local)
                writer.write(text)
                writer.write_eof()
                answers.append(await asyncio.wait_for(reader.read(), 10))
                writer.close()
            return line, answers
        finally:
            if kubectl is not None and kubectl.returncode is None:
                kubectl.terminate()
                await kubectl.wait()
            await runner.cleanup()
            server.close()

    with RunningAPIServer(str(tmp_path / "api.db")) as api:
        line, answers = on_uvloop(scenario(api.url))
    assert line.startswith("Forwarding from 127.0.0.1:")
    assert answers == [b"FIRST", b"SECOND"]
