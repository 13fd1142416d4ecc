"""`kubectl port-forward`: TCP connections to a pod's ports, as SPDY/3.1 streams over a WebSocket.

kubectl (1.31+) asks `GET .../pods/{name}/portforward` with an Upgrade to WebSocket and the subprotocol
SPDY/3.1+portforward.k8s.io: the WebSocket's binary messages then carry a SPDY/3.1 session, as one byte
stream (kubectl is the SPDY client; a message need not hold a whole frame). The API server relays the
WebSocket to the agent of the pod's node (`/portForward/{namespace}/{pod}` on its health port, as the
kubelet's); the agent runs a `Session` over it. For each connection made to a local port, kubectl opens
two streams whose headers say `streamtype` (error or data), `port` and `requestid`. The agent answers
each stream (SYN_REPLY), connects to the port on the pod's localhost (inside the pod's network
namespace, as the kubelet does: a server listening on 127.0.0.1 in the pod is reached too), and copies
bytes both ways on the data stream; a half-close goes through as one. Why a connection could not be
made is written on the error stream. Both streams end (FIN) when the connection does.

Frames (SPDY/3, draft 3 section 2.2): a control frame is 0x8003, a 16-bit type, 8 bits of flags and a
24-bit length, then its payload; a data frame is a 31-bit stream id, flags (FIN = 1) and length.
Header blocks are zlib streams, one per direction for the whole session, with the spec's dictionary.
kubectl's SPDY library does no flow control, so neither does this (WINDOW_UPDATE is read and ignored).

Like the agent's exec endpoint, this asks for no credentials: a lab's trust model (see podexec.py).
"""
from __future__ import annotations

import asyncio
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Awaitable, Callable

PROTOCOL = "SPDY/3.1+portforward.k8s.io"

SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, NOOP, PING, GOAWAY, HEADERS, WINDOW_UPDATE = range(1, 10)
FLAG_FIN = 0x01
PROTOCOL_ERROR, INVALID_STREAM, REFUSED_STREAM = 1, 2, 3          # RST_STREAM status codes
GOAWAY_OK, GOAWAY_PROTOCOL_ERROR = 0, 1
MAX_HEADER_BLOCK = 64 * 1024      # decompressed; kubectl's are ~60 bytes
DATA_CHUNK = 32 * 1024            # bytes read from the pod's connection per data frame

# The header compression dictionary of SPDY/3 (draft 3, section 2.6.10.1): each of these words with its
# 32-bit big-endian length before it, then the text after them.
_DICTIONARY_WORDS = (
    "options head post put delete trace accept accept-charset accept-encoding accept-language accept-ranges "
    "age allow authorization cache-control connection content-base content-encoding content-language "
    "content-length content-location content-md5 content-range content-type date etag expect expires from "
    "host if-match if-modified-since if-none-match if-range if-unmodified-since last-modified location "
    "max-forwards pragma proxy-authenticate proxy-authorization range referer retry-after server te trailer "
    "transfer-encoding upgrade user-agent vary via warning www-authenticate method get status").split() + [
    "200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"]
_DICTIONARY_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
    "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
    "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.")
DICTIONARY = b"".join(struct.pack(">I", len(w)) + w.encode() for w in _DICTIONARY_WORDS) + _DICTIONARY_TAIL.encode()


class ProtocolError(ValueError):
    """The peer broke SPDY/3.1 framing: the session ends (GOAWAY with PROTOCOL_ERROR)."""


class Unreachable(OSError):
    """The pod's port could not be connected to; the words say where and why."""


@dataclass(frozen=True)
class Frame:
    """A control frame (`kind` one of the types above) or a data frame (kind 0); `stream` is 0 for
    control frames without one; `headers` for SYN_STREAM, SYN_REPLY and HEADERS."""
    kind: int
    flags: int
    stream: int = 0
    data: bytes = b""
    headers: dict = field(default_factory=dict)
    value: int = 0   # PING id, RST_STREAM/GOAWAY status

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)


# ---- framing (pure) ---------------------------------------------------------------------------------

class Framer:
    """Frames from a byte stream (`feed`) and frames to bytes, with the session's two zlib contexts."""

    def __init__(self):
        self._buffer = bytearray()
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8,
                                         zlib.Z_DEFAULT_STRATEGY, zdict=DICTIONARY)

    def feed(self, data: bytes) -> list[Frame]:
        """Every whole frame the bytes so far complete; ProtocolError when they cannot be SPDY/3."""
        self._buffer += data
        frames = []
        while len(self._buffer) >= 8:
            length = int.from_bytes(self._buffer[5:8], "big")
            if len(self._buffer) < 8 + length:
                break
            head, payload = bytes(self._buffer[:8]), bytes(self._buffer[8:8 + length])
            del self._buffer[:8 + length]
            frames.append(self._parse(head, payload))
        return frames

    def _parse(self, head: bytes, payload: bytes) -> Frame:
        first, flags = struct.unpack_from(">I", head)[0], head[4]
        if not first & 0x80000000:
            return Frame(0, flags, first & 0x7FFFFFFF, payload)
        version, kind = (first >> 16) & 0x7FFF, first & 0xFFFF
        if version != 3:
            raise ProtocolError(f"SPDY version {version}: only 3 is spoken")
        if kind in (SYN_STREAM, SYN_REPLY, HEADERS):
            fixed = 10 if kind == SYN_STREAM else 4
            if len(payload) < fixed:
                raise ProtocolError(f"frame type {kind} of {len(payload)} bytes is too short")
            stream = struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF
            return Frame(kind, flags, stream, headers=self._headers(payload[fixed:]))
        if kind in (RST_STREAM, WINDOW_UPDATE, GOAWAY):
            if len(payload) < 8:
                raise ProtocolError(f"frame type {kind} of {len(payload)} bytes is too short")
            stream, value = struct.unpack_from(">II", payload)
            return Frame(kind, flags, stream & 0x7FFFFFFF, value=value)
        if kind == PING:
            if len(payload) < 4:
                raise ProtocolError("PING of fewer than 4 bytes")
            return Frame(kind, flags, value=struct.unpack_from(">I", payload)[0])
        return Frame(kind, flags, data=payload)   # SETTINGS, NOOP, others: read past

    def _headers(self, block: bytes) -> dict:
        try:
            raw = self._inflate.decompress(block, MAX_HEADER_BLOCK)
        except zlib.error as err:
            raise ProtocolError(f"header block does not decompress: {err}") from None
        if self._inflate.unconsumed_tail:
            raise ProtocolError(f"header block over {MAX_HEADER_BLOCK} bytes")
        try:
            (count,), offset, headers = struct.unpack_from(">I", raw), 4, {}
            for _ in range(count):
                (size,) = struct.unpack_from(">I", raw, offset)
                name = raw[offset + 4:offset + 4 + size].decode("latin-1")
                offset += 4 + size
                (size,) = struct.unpack_from(">I", raw, offset)
                headers[name.lower()] = raw[offset + 4:offset + 4 + size].decode("latin-1")
                offset += 4 + size
        except struct.error:
            raise ProtocolError("header block ends inside a header") from None
        return headers

    def _header_block(self, headers: dict) -> bytes:
        raw = struct.pack(">I", len(headers)) + b"".join(
            struct.pack(">I", len(k)) + k.encode() + struct.pack(">I", len(v)) + v.encode() for k, v in headers.items())
        return self._deflate.compress(raw) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    # Each builder returns the frame's bytes; the header blocks must go out in the order built.
    @staticmethod
    def control(kind: int, payload: bytes, flags: int = 0) -> bytes:
        return struct.pack(">HHI", 0x8003, kind, (flags << 24) | len(payload)) + payload

    def syn_reply(self, stream: int, headers: dict | None = None, fin: bool = False) -> bytes:
        return self.control(SYN_REPLY, struct.pack(">I", stream) + self._header_block(headers or {}),
                            FLAG_FIN if fin else 0)

    def syn_stream(self, stream: int, headers: dict, fin: bool = False) -> bytes:
        """A client's stream opening (the tests' client; the agent never opens one)."""
        return self.control(SYN_STREAM, struct.pack(">IIBB", stream, 0, 0, 0) + self._header_block(headers),
                            FLAG_FIN if fin else 0)

    @staticmethod
    def data(stream: int, data: bytes, fin: bool = False) -> bytes:
        return struct.pack(">II", stream, ((FLAG_FIN if fin else 0) << 24) | len(data)) + data

    @classmethod
    def rst_stream(cls, stream: int, status: int) -> bytes:
        return cls.control(RST_STREAM, struct.pack(">II", stream, status))

    @classmethod
    def ping(cls, ping_id: int) -> bytes:
        return cls.control(PING, struct.pack(">I", ping_id))

    @classmethod
    def goaway(cls, last_stream: int, status: int) -> bytes:
        return cls.control(GOAWAY, struct.pack(">II", last_stream, status))


def parse_port(text: str | None) -> int:
    """The `port` header's value; ValueError with kubelet's words when it is not a port."""
    try:
        port = int(text or "")
    except ValueError:
        raise ValueError(f"unable to parse {text!r} as a port") from None
    if not 0 < port < 65536:
        raise ValueError(f"invalid port {port}: must be between 1 and 65535")
    return port


# ---- the session (shell) ------------------------------------------------------------------------------

Connect = Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@dataclass
class _Pair:
    """One forwarded connection: kubectl's error and data streams of one requestid."""
    port_text: str
    error_stream: int = 0
    data_stream: int = 0
    writer: asyncio.StreamWriter | None = None
    task: asyncio.Task | None = None
    early: list = field(default_factory=list)   # kubectl's data before the pod's connection is made
    early_fin: bool = False


class Session:
    """One SPDY session: `run(incoming)` reads byte chunks until the peer is gone, `send` writes bytes.
    `connect(port)` opens a connection to the pod's port; `describe` names the pod in error messages."""

    def __init__(self, send: Callable[[bytes], Awaitable[None]], connect: Connect, describe: str):
        self.framer = Framer()
        self.send, self.connect, self.describe = send, connect, describe
        self.pairs: dict[str, _Pair] = {}
        self.by_stream: dict[int, _Pair] = {}
        self.last_stream = 0
        self.forwarded = 0

    async def run(self, incoming) -> None:
        """`incoming`: an async iterator of byte chunks. Ends all connections when it ends."""
        try:
            async for chunk in incoming:
                for frame in self.framer.feed(chunk):
                    await self.handle(frame)
        except ProtocolError:
            await self._send(self.framer.goaway(self.last_stream, GOAWAY_PROTOCOL_ERROR))
            raise
        finally:
            tasks = [p.task for p in self.pairs.values() if p.task]
            for pair in self.pairs.values():
                if pair.writer is not None:
                    pair.writer.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def handle(self, frame: Frame) -> None:
        if frame.kind == SYN_STREAM:
            await self._open(frame)
        elif frame.kind == 0:
            await self._data(frame)
        elif frame.kind == PING:
            await self._send(self.framer.ping(frame.value))
        elif frame.kind == RST_STREAM:
            pair = self.by_stream.get(frame.stream)
            if pair is not None and pair.writer is not None:
                pair.writer.close()

    async def _open(self, frame: Frame) -> None:
        if frame.stream % 2 == 0 or frame.stream <= self.last_stream:
            await self._send(self.framer.rst_stream(frame.stream, PROTOCOL_ERROR))
            return
        self.last_stream = frame.stream
        kind, request = frame.headers.get("streamtype"), frame.headers.get("requestid", "")
        if kind not in ("error", "data"):
            await self._send(self.framer.rst_stream(frame.stream, REFUSED_STREAM))
            return
        await self._send(self.framer.syn_reply(frame.stream))
        pair = self.pairs.setdefault(request, _Pair(frame.headers.get("port", "")))
        if kind == "error":
            pair.error_stream = frame.stream
        else:
            pair.data_stream = frame.stream
        self.by_stream[frame.stream] = pair
        if pair.error_stream and pair.data_stream and pair.task is None:
            pair.task = asyncio.ensure_future(self._forward(request, pair))

    async def _data(self, frame: Frame) -> None:
        pair = self.by_stream.get(frame.stream)
        if pair is None:
            await self._send(self.framer.rst_stream(frame.stream, INVALID_STREAM))
            return
        if frame.stream != pair.data_stream:
            return   # the error stream carries nothing from kubectl (it only closes its side)
        if pair.writer is None:   # kubectl writes as soon as its stream is answered
            pair.early.append(frame.data)
            pair.early_fin = pair.early_fin or frame.fin
            return
        await _write(pair.writer, frame.data, frame.fin)

    async def _forward(self, request: str, pair: _Pair) -> None:
        try:
            port = parse_port(pair.port_text)
            reader, pair.writer = await self.connect(port)
        except (ValueError, OSError) as err:
            reason = os.strerror(err.errno) if isinstance(err, OSError) and type(err) is not Unreachable and err.errno else err
            message = f"error forwarding port {pair.port_text} to pod {self.describe}: {reason}"
            await self._send(self.framer.data(pair.error_stream, message.encode(), fin=True)
                             + self.framer.data(pair.data_stream, b"", fin=True))
            self._forget(request, pair)
            return
        self.forwarded += 1
        await _write(pair.writer, b"".join(pair.early), pair.early_fin)
        try:
            while chunk := await reader.read(DATA_CHUNK):
                await self._send(self.framer.data(pair.data_stream, chunk))
        except ConnectionError:
            pass
        finally:
            pair.writer.close()
            await self._send(self.framer.data(pair.data_stream, b"", fin=True)
                             + self.framer.data(pair.error_stream, b"", fin=True))
            self._forget(request, pair)

    def _forget(self, request: str, pair: _Pair) -> None:
        self.pairs.pop(request, None)
        self.by_stream.pop(pair.error_stream, None)
        self.by_stream.pop(pair.data_stream, None)

    async def _send(self, data: bytes) -> None:
        try:
            await self.send(data)
        except ConnectionError:
            pass   # kubectl went away: run() ends with its stream


async def _write(writer: asyncio.StreamWriter, data: bytes, fin: bool) -> None:
    """kubectl's bytes to the pod; its FIN as a half-close, so the pod sees the end of the request."""
    try:
        if data:
            writer.write(data)
            await writer.drain()
        if fin and writer.can_write_eof():
            writer.write_eof()
    except ConnectionError:
        pass   # the pod's side is gone; _forward ends the streams


# ---- the agent's side: a WebSocket in, connections in a pod's network namespace ----------------------

async def serve_websocket(ws, connect: Connect, describe: str) -> Session:
    """Run a Session over an aiohttp WebSocket (its binary messages are the SPDY byte stream)."""
    import aiohttp

    async def incoming():
        async for message in ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                yield message.data

    session = Session(ws.send_bytes, connect, describe)
    await session.run(incoming())
    return session


def connector(netns_name: str | None) -> Connect:
    """`connect(port)` for a pod: its localhost (127.0.0.1, then ::1), from inside its namespace."""
    async def connect(port: int):
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(None, _connected_socket, netns_name, port)
        return await asyncio.open_connection(sock=sock)
    return connect


def _connected_socket(netns_name: str | None, port: int):
    """A socket connected to the port on localhost in the namespace (made there: it stays there). A
    connect to localhost is answered at once, so this blocks its executor thread only briefly."""
    import socket

    from netplane import netns
    failure = None
    with netns.inside(netns_name):
        for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(5)
                sock.connect((address, port))
                sock.setblocking(False)
                return sock
            except OSError as err:
                sock.close()
                failure = failure or Unreachable(f"connect to {address}:{port} in the pod: "
                                                 f"{os.strerror(err.errno) if err.errno else err}")
    raise failure
