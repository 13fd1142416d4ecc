"""The calibration proxy of `bench/ingress.py --calibrate`: what Python itself costs per proxied request.

    python bench/passthrough.py LISTEN_PORT UPSTREAM_PORT

uvloop + httptools and nothing else: one upstream, a keep-alive pool of connections to it, each GET
request's head rebuilt with X-Forwarded-For and X-Real-IP, each response passed through byte for byte
(httptools only finds where it ends). No routing, no hop-by-hop filtering, no framing of its own, no
bodies, no timeouts, no retries, no stats: not a proxy to use, but the floor under any Python proxy
built on these libraries, measured beside nginx and netplane ingress on the same machine in one run.
"""
from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, pool: list):
        self.pool = pool
        self.client: Client | None = None
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes):
        if self.client is not None and not self.client.transport.is_closing():
            self.client.transport.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self):
        client, self.client = self.client, None
        self.pool.append(self)
        if client is not None:
            client.done()

    def connection_lost(self, exc):
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None:
            self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, pool: list, upstream: tuple):
        self.pool, self.upstream = pool, upstream
        self.parser = httptools.HttpRequestParser(self)
        self.waiting: list[bytes] = []
        self.busy = False
        self.headers: list[bytes] = []
        self.url = b""
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.waiting.clear()

    def data_received(self, data: bytes):
        self.parser.feed_data(data)

    def on_message_begin(self):
        self.headers = []
        self.url = b""

    def on_url(self, url: bytes):
        self.url += url

    def on_header(self, name: bytes, value: bytes):
        self.headers.append(b"%s: %s\r\n" % (name, value))

    def on_message_complete(self):
        self.waiting.append(b"GET %s HTTP/1.1\r\n%sX-Forwarded-For: 127.0.0.1\r\nX-Real-IP: 127.0.0.1\r\n\r\n"
                            % (self.url, b"".join(self.headers)))
        self.next()

    def next(self):
        if self.busy or not self.waiting or self.transport.is_closing():
            return
        self.busy = True
        head = self.waiting.pop(0)
        if self.pool:
            upstream = self.pool.pop()
            upstream.client = self
            upstream.transport.write(head)
        else:
            asyncio.ensure_future(self.connect(head))

    async def connect(self, head: bytes):
        _, upstream = await asyncio.get_running_loop().create_connection(lambda: Upstream(self.pool), *self.upstream)
        upstream.client = self
        upstream.transport.write(head)

    def done(self):
        self.busy = False
        self.next()


async def serve(listen_port: int, upstream_port: int) -> None:
    pool: list = []
    upstream = ("127.0.0.1", upstream_port)
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: Client(pool, upstream), "127.0.0.1", listen_port)
    await asyncio.Event().wait()


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    uvloop.install()
    try:
        asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2])))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
