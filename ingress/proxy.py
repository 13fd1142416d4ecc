"""The HTTP/1.1 reverse proxy: asyncio.Protocol + httptools on uvloop, no framework on the hot path.

One ClientConnection per downstream connection parses requests with httptools; each request becomes
an Exchange, routed through the current RouteTable (looked up per request, through a cache of
(Host, path) lookups that is dropped with each swap, so a swapped table takes effect at once without
touching open connections). Exchanges run one at a time per connection, in
order (pipelined requests wait their turn). An Exchange borrows an UpstreamConnection from the pool
of its endpoint (round-robin across the backend's ready endpoints), writes the rebuilt request head,
streams the body, and streams the response back; then the upstream connection returns to its pool.

Framing and safety (httptools/llhttp is strict about CL+TE, duplicate Content-Length, bad chunks,
obs-fold; what it does not check, we do): exactly one Host on HTTP/1.1 (else 400), a cap on the header
section (431) and on the body (413), hop-by-hop headers removed both ways, X-Forwarded-* and X-Real-IP
set from the connection (incoming values are replaced, as ingress-nginx does by default).
Upgrade (WebSocket): after a 101 from upstream both connections become a two-way byte pipe.
Timeouts are checked by one sweeper per process instead of a timer per request.
"""
from __future__ import annotations

import asyncio
import collections
import http
import json
import logging
import sys
import time
from dataclasses import dataclass

import httptools

from netplane.ingress.routes import Backend, Endpoint, Route, RouteTable, normalise_host

log = logging.getLogger("ingress")

SERVER_NAME = b"netplane-ingress"

# Request headers we never copy upstream: hop-by-hop (RFC 9110 7.6.1), framing we redo ourselves,
# and the forwarding headers we set from the connection (the client's own values are not trusted).
# `proxy` is dropped against httpoxy.
_REQUEST_SPECIAL = frozenset([
    b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"proxy-connection",
    b"te", b"trailer", b"upgrade", b"proxy", b"x-forwarded-for", b"x-forwarded-proto",
    b"x-forwarded-host", b"x-forwarded-port", b"x-real-ip"])
_RESPONSE_SPECIAL = frozenset([
    b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"proxy-connection", b"te",
    b"trailer", b"upgrade", b"server"])
_STANDARD_HOP = frozenset([b"close", b"keep-alive", b"upgrade", b"te", b"trailer", b"transfer-encoding",
                           b"proxy-connection"])
_IDEMPOTENT = frozenset([b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"])
_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, phrase) for code, phrase in _REASONS.items()}

# Flow-control marks: pause reading the client while this much request body waits for upstream.
_BUFFER_HIGH = 256 * 1024
# Keep a copy of what was sent upstream (for a retry on a stale pooled connection) up to this size.
_RETAIN_LIMIT = 64 * 1024
# Route lookups are cached per (Host header, path) while a table is current, up to this many; the
# cache is dropped whole when full (cheaper than LRU bookkeeping per request) and on every swap.
_ROUTE_CACHE_SIZE = 4096
_ROUTE_CACHE_MAX_KEY = 512    # longer host+path pairs are looked up every time, never cached
# A lingering close reads and drops at most this much, for at most this long.
_LINGER_BYTES = 64 * 1024 * 1024
_LINGER_SECONDS = 2.0


@dataclass(frozen=True)
class Settings:
    connect_timeout: float = 5.0
    read_timeout: float = 60.0            # upstream silent this long -> 504 (or abort mid-body)
    client_header_timeout: float = 60.0   # a request head not complete within this -> 408
    client_body_timeout: float = 60.0     # no request body bytes for this long -> 408 / abort
    send_timeout: float = 60.0            # the client took none of our pending bytes for this long -> close
    keepalive_timeout: float = 75.0       # idle client connection closed after this
    upstream_idle_timeout: float = 60.0   # idle pooled upstream connection closed after this
    tunnel_idle_timeout: float = 3600.0   # an upgraded (WebSocket) pipe idle this long is closed
    max_header_bytes: int = 32 * 1024     # request line + headers; over -> 431
    max_headers: int = 100                # header count; over -> 431
    max_body_bytes: int = 0               # 0 = no limit; over -> 413
    pool_size: int = 64                   # idle upstream connections kept per endpoint
    connect_tries: int = 3                # endpoints tried when connecting fails
    access_log: bool = True


class _Reject(Exception):
    """Raised from a parser callback: answer `status` and close."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


# ------------------------------------------------------------------------------------ shared state

class Stats:
    """Plain counters (cheap on the hot path); exported to Prometheus at scrape time."""

    def __init__(self):
        self.responses: collections.Counter = collections.Counter()   # status -> count
        self.upstream_connects = 0
        self.upstream_connect_failures = 0
        self.upstream_reused = 0
        self.retries = 0
        self.open_connections = 0
        self.table_swaps = 0

    COUNTERS = ("upstream_connects", "upstream_connect_failures", "upstream_reused", "retries", "table_swaps")

    def snapshot(self) -> dict:
        """Plain data: what a worker reports to its supervisor (workers.py)."""
        out = {name: getattr(self, name) for name in self.COUNTERS}
        out["responses"] = {str(code): n for code, n in self.responses.items()}
        out["open_connections"] = self.open_connections
        return out


class AccessLog:
    """JSON lines to stderr, buffered and flushed by the sweeper (no syscall per request)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.lines: list[str] = []

    def add(self, entry: dict) -> None:
        self.lines.append(json.dumps(entry))
        if len(self.lines) >= 512:
            self.flush()

    def flush(self) -> None:
        if self.lines:
            self.stream.write("\n".join(self.lines) + "\n")
            self.stream.flush()
            self.lines.clear()


class Proxy:
    """What all connections of one process share: the route table, pools, round-robin, stats."""

    def __init__(self, table: RouteTable, settings: Settings = Settings()):
        self.table = table
        self.route_cache: dict[tuple[bytes, bytes], Route] = {}
        self.settings = settings
        self.stats = Stats()
        self.access_log = AccessLog() if settings.access_log else None
        self.pools: dict[Endpoint, list[UpstreamConnection]] = {}
        self.rr: dict[str, int] = {}
        self.clients: set[ClientConnection] = set()
        self.ssl_redirect_port = 0     # when set: plain HTTP to a host with a certificate -> 308
        self.loop = asyncio.get_event_loop()
        self._sweeper: asyncio.TimerHandle | None = None

    # -- route table
    def swap_table(self, table: RouteTable) -> None:
        """Take a new table for every request from now on; open connections are untouched, idle
        pooled connections to endpoints that are gone are closed."""
        self.table = table
        self.route_cache = {}
        self.stats.table_swaps += 1
        live = {ep for vhosts in _all_backends(table) for ep in vhosts.endpoints}
        for endpoint in list(self.pools):
            if endpoint not in live:
                for conn in self.pools.pop(endpoint):
                    conn.close()

    def route(self, host: bytes, path: bytes) -> Route:
        """The route for a raw Host header and path, from the cache when this table has seen them."""
        key = (host, path)
        route = self.route_cache.get(key)
        if route is None:
            route = self.table.route(host.decode("latin-1"), path.decode("latin-1"))
            if len(host) + len(path) <= _ROUTE_CACHE_MAX_KEY:
                if len(self.route_cache) >= _ROUTE_CACHE_SIZE:
                    self.route_cache = {}
                self.route_cache[key] = route
        return route

    # -- endpoints and connections
    def pick_endpoint(self, backend: Backend, avoid: set[Endpoint]) -> Endpoint | None:
        endpoints = backend.endpoints
        n = len(endpoints)
        if n == 1:   # the common case needs no round-robin bookkeeping
            return None if endpoints[0] in avoid else endpoints[0]
        start = self.rr.get(backend.service, 0)
        self.rr[backend.service] = start + 1
        for i in range(n):
            endpoint = endpoints[(start + i) % n]
            if endpoint not in avoid:
                return endpoint
        return None

    def give_back(self, conn: UpstreamConnection) -> None:
        pool = self.pools.get(conn.endpoint)
        if pool is None:
            pool = self.pools[conn.endpoint] = []
        elif len(pool) >= self.settings.pool_size:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        conn.fresh = False
        if conn.reading_paused:   # idle, it must still see the server close it
            conn.resume_reading()
        pool.append(conn)

    # -- timeouts
    def start_sweeper(self, interval: float = 0.25) -> None:
        def tick():
            self.sweep(self.loop.time())
            self._sweeper = self.loop.call_later(interval, tick)
        self._sweeper = self.loop.call_later(interval, tick)

    def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        for pool in self.pools.values():
            for conn in pool:
                conn.close()
        self.pools.clear()
        if self.access_log:
            self.access_log.flush()

    def sweep(self, now: float) -> None:
        for client in list(self.clients):
            client.check_deadline(now)
        idle_limit = now - self.settings.upstream_idle_timeout
        for pool in self.pools.values():
            if pool and pool[0].idle_since < idle_limit:
                for conn in [c for c in pool if c.idle_since < idle_limit]:
                    pool.remove(conn)
                    conn.close()
        if self.access_log:
            self.access_log.flush()


def _all_backends(table: RouteTable):
    vhosts = list(table.exact_hosts.values()) + list(table.wildcard_hosts.values())
    if table.any_host:
        vhosts.append(table.any_host)
    for vhost in vhosts:
        for route in [*vhost.exact.values(), *vhost.prefix.values(), *vhost.plain.values()]:
            if route.backend:
                yield route.backend
    if table.default_route.backend:
        yield table.default_route.backend


# ------------------------------------------------------------------------------------ one request

class Exchange:
    """One request and its response, on one client connection."""

    __slots__ = ("head_size", "method", "url", "version", "keep_alive", "host", "host_count", "head_parts",
                 "conn_tokens", "upgrade", "content_length", "chunked", "body_size", "pending",
                 "pending_size", "retained", "retained_size", "request_done", "response_started", "response_done",
                 "draining", "upstream", "route", "endpoint", "tried", "status", "bytes_out",
                 "started", "client_chunked", "close_after", "path", "head_sent")

    def __init__(self, now: float):
        self.method = b"-"
        self.version = "1.1"
        self.keep_alive = False
        self.head_size = 0
        self.url = b""
        self.head_parts: list[bytes] = []
        self.host = b""
        self.host_count = 0
        self.conn_tokens: list[bytes] = []
        self.upgrade = b""
        self.content_length = -1
        self.chunked = False
        self.body_size = 0
        self.pending: list[bytes] = []      # request bytes waiting for the upstream connection
        self.pending_size = 0
        self.retained: list[bytes] | None = []   # what was sent upstream, while small (for a retry)
        self.retained_size = 0
        self.request_done = False
        self.response_started = False
        self.response_done = False
        self.draining = False
        self.head_sent = False
        self.upstream: UpstreamConnection | None = None
        self.route: Route | None = None
        self.endpoint: Endpoint | None = None
        self.tried: set[Endpoint] = set()
        self.status = 0
        self.bytes_out = 0
        self.started = now
        self.client_chunked = False
        self.close_after = False
        self.path = b""


class ClientConnection(asyncio.Protocol):
    """One downstream connection."""

    def __init__(self, proxy: Proxy, scheme: bytes = b"http", port: int = 80):
        self.proxy = proxy
        self.loop = proxy.loop
        self.settings = proxy.settings
        self.scheme = scheme
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[Exchange] = collections.deque()
        self.incoming: Exchange | None = None       # the request being parsed
        self.head_bytes = 0
        self.batch: list[bytes] | None = None
        self.in_body = False
        self.body_expected = False   # a failed request announced a body we never read
        self.lingering = False
        self.lingered = 0
        self.client_ip = "-"
        self.forwarded = b""
        self.tunnel: UpstreamConnection | None = None
        self.pause_reasons: set[str] = set()
        self.write_paused = False
        self.flushing = False        # closed by us, with bytes still waiting for the client to take
        self.send_since = 0.0        # send timeout: when the client last took any of our bytes
        self.send_mark = 0           # ... and how many were waiting then
        self.closed = False
        self.read_eof = False
        self.last_activity = 0.0
        self.head_started = 0.0      # the first byte of the request head being read

    # -- asyncio callbacks
    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("-", 0)
        self.client_ip = peer[0]
        ip = self.client_ip.encode()
        self.forwarded = (b"X-Forwarded-For: %s\r\nX-Real-IP: %s\r\nX-Forwarded-Proto: %s\r\n"
                          b"X-Forwarded-Port: %d\r\n" % (ip, ip, self.scheme, self.port))
        self.last_activity = self.loop.time()
        self.proxy.clients.add(self)
        self.proxy.stats.open_connections += 1

    def connection_lost(self, exc):
        self.closed = True
        self.proxy.clients.discard(self)
        self.proxy.stats.open_connections -= 1
        if self.tunnel is not None:
            self.tunnel.close()
        for ex in self.queue:
            if ex.upstream is not None:
                ex.upstream.detach_and_abort()
        self.queue.clear()

    def data_received(self, data: bytes):
        self.last_activity = self.loop.time()
        if self.lingering:
            self.lingered += len(data)
            if self.lingered > _LINGER_BYTES:
                self.abort()
            return
        if self.tunnel is not None:
            self.tunnel.transport.write(data)
            return
        if not self.in_body:
            self.head_bytes += len(data)
        outer = self.batch is None
        if outer:
            self.batch = []   # writes collect here: a response head and body go out in one send
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._start_tunnel_wait(data[upgrade.args[0]:])
        except httptools.HttpParserCallbackError as err:
            cause = err.__context__
            if isinstance(cause, _Reject):
                self.fail(cause.status, cause.reason)
            else:
                log.exception("request handling failed", exc_info=cause)
                self.fail(500, "internal error")
        except httptools.HttpParserError as err:
            self.fail(400, f"malformed request: {err}")
        else:
            # Still in a head after all that: bound what httptools buffers before it calls us back.
            if not self.in_body and self.head_bytes > self.settings.max_header_bytes + 65536:
                self.fail(431, "request header section too large")
        finally:
            if outer:
                self.flush()

    def pause_writing(self):
        self.write_paused = True
        self._watch_send()
        if self.tunnel is not None:
            self.tunnel.transport.pause_reading()
        elif self.queue and self.queue[0].upstream is not None:
            self.queue[0].upstream.pause_reading()

    def resume_writing(self):
        self.write_paused = False
        if self.tunnel is not None:
            self.tunnel.transport.resume_reading()
        elif self.queue and self.queue[0].upstream is not None:
            self.queue[0].upstream.resume_reading()

    def eof_received(self):
        if self.lingering:
            self.abort()
            return False
        tunnel = self.tunnel
        if tunnel is None or tunnel.closed or not tunnel.transport.can_write_eof():
            return False
        self.read_eof = True
        if tunnel.read_eof:   # both directions finished
            tunnel.close()
            return False
        tunnel.transport.write_eof()   # half-close: the other side may still answer
        return True

    # -- flow control on the client side
    def pause(self, reason: str):
        if not self.pause_reasons and not self.closed:
            self.transport.pause_reading()
        self.pause_reasons.add(reason)

    def resume(self, reason: str):
        if reason in self.pause_reasons:
            self.pause_reasons.discard(reason)
            if not self.pause_reasons and not self.closed:
                self.transport.resume_reading()
                # The body timeout did not run while we held the client; it starts again from now.
                self.last_activity = self.loop.time()

    # -- httptools callbacks (request)
    def on_message_begin(self):
        self.incoming = Exchange(time.monotonic())
        self.head_started = self.last_activity   # set by data_received, which is calling us

    def on_url(self, url: bytes):
        ex = self.incoming
        ex.url += url
        ex.head_size += len(url)
        if ex.head_size > self.settings.max_header_bytes:
            raise _Reject(414, "request target too long")

    def on_header(self, name: bytes, value: bytes):
        ex = self.incoming
        parts = ex.head_parts
        if len(parts) >= self.settings.max_headers:
            raise _Reject(431, "too many request headers")
        ex.head_size += len(name) + len(value) + 4
        if ex.head_size > self.settings.max_header_bytes:
            raise _Reject(431, "request header section too large")
        lname = name.lower()
        if lname not in _REQUEST_SPECIAL:
            parts.append(b"%s: %s\r\n" % (name, value))
        elif lname == b"host":
            ex.host = value
            ex.host_count += 1
        elif lname == b"content-length":
            ex.content_length = int(value)   # llhttp has validated it
        elif lname == b"transfer-encoding":
            # llhttp refuses a request whose final coding is not `chunked`, but only after
            # on_headers_complete; None marks that case so it is refused before anything goes upstream.
            ex.chunked = True if value.rsplit(b",", 1)[-1].strip(b" \t").lower() == b"chunked" else None
        elif lname == b"connection":
            ex.conn_tokens += [t.strip().lower() for t in value.split(b",")]
        elif lname == b"upgrade":
            ex.upgrade = value

    def on_headers_complete(self):
        ex = self.incoming
        self.head_bytes = 0
        self.in_body = True
        parser = self.parser
        ex.method = parser.get_method()
        ex.version = parser.get_http_version()
        ex.keep_alive = parser.should_keep_alive()
        if ex.host_count > 1 or (ex.host_count == 0 and ex.version != "1.0"):
            raise _Reject(400, "a request needs exactly one Host header")
        if ex.chunked is None:
            raise _Reject(400, "Transfer-Encoding must end in chunked")
        if ex.method == b"CONNECT":
            raise _Reject(405, "CONNECT is not supported")
        limit = self.settings.max_body_bytes
        if limit and ex.content_length > limit:
            raise _Reject(413, f"request body over {limit} bytes")
        self.queue.append(ex)
        if len(self.queue) == 1:
            self.start(ex)
        else:
            self.pause("pipeline")   # later requests wait; stop reading more of them

    def on_body(self, body: bytes):
        ex = self.incoming
        ex.body_size += len(body)
        limit = self.settings.max_body_bytes
        if limit and ex.body_size > limit:
            raise _Reject(413, f"request body over {limit} bytes")
        if ex.draining:
            return
        self.send_body(ex, b"%x\r\n%s\r\n" % (len(body), body) if ex.chunked else body)

    def on_message_complete(self):
        ex = self.incoming
        self.incoming = None
        self.in_body = False
        ex.request_done = True
        if ex.draining:
            self.retire(ex)
        elif ex.chunked:
            self.send_body(ex, b"0\r\n\r\n")

    # -- running an exchange
    def start(self, ex: Exchange):
        url = ex.url
        if url[:1] == b"/":
            q = url.find(b"?")
            ex.path = url if q < 0 else url[:q]
        else:
            ex.path = self._absolute_form(ex, url)
        proxy = self.proxy
        if proxy.ssl_redirect_port and self.scheme == b"http" and proxy.table.certificates:
            name = normalise_host(ex.host.decode("latin-1"))
            if proxy.table.certificate_for(name) is not None:
                return self.redirect(ex, name, proxy.ssl_redirect_port)
        route = proxy.route_cache.get((ex.host, ex.path)) or proxy.route(ex.host, ex.path)
        ex.route = route
        backend = route.backend
        if backend is None:
            return self.respond(ex, route.status, route.reason)
        if backend.problem or not backend.endpoints:
            return self.respond(ex, 503, backend.problem or "no ready endpoints")
        self.connect(ex)

    def _absolute_form(self, ex: Exchange, url: bytes) -> bytes:
        if url == b"*":
            return b"*"
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            raise _Reject(400, "invalid request target") from None
        if parsed.host:   # RFC 9112 3.2.2: the target's authority replaces Host
            ex.host = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
        path = parsed.path or b"/"
        ex.url = path + (b"?" + parsed.query if parsed.query else b"")
        return path

    def connect(self, ex: Exchange, timed_out: bool = False):
        backend = ex.route.backend
        tried = ex.tried
        endpoints = backend.endpoints
        if len(endpoints) == 1 and not tried:   # the common case: no round-robin, nothing to avoid
            endpoint = endpoints[0]
        else:
            endpoint = self.proxy.pick_endpoint(backend, tried)
        if endpoint is None or len(tried) >= self.settings.connect_tries:
            if timed_out:   # the last try timed out: a gateway timeout, as nginx answers
                return self.respond(ex, 504, "no endpoint of %s accepted a connection in %gs"
                                    % (backend.service, self.settings.connect_timeout))
            return self.respond(ex, 502, "no endpoint of %s accepted a connection" % backend.service)
        tried.add(endpoint)
        ex.endpoint = endpoint
        proxy = self.proxy
        pool = proxy.pools.get(endpoint)
        while pool:   # an idle pooled connection (one the server closed meanwhile is dropped)
            conn = pool.pop()
            if not conn.closed:
                proxy.stats.upstream_reused += 1
                return self.attach(ex, conn)
        self.loop.create_task(self._open(ex, endpoint))

    async def _open(self, ex: Exchange, endpoint: Endpoint):
        stats = self.proxy.stats
        stats.upstream_connects += 1
        try:
            _, conn = await asyncio.wait_for(self.loop.create_connection(
                lambda: UpstreamConnection(self.proxy, endpoint), endpoint.address, endpoint.port),
                self.settings.connect_timeout)
        except (OSError, asyncio.TimeoutError) as err:
            stats.upstream_connect_failures += 1
            log.warning("connect to %s failed: %s", endpoint, err or "timeout")
            if not self.closed and self.queue and self.queue[0] is ex:
                stats.retries += 1
                self.connect(ex, isinstance(err, (TimeoutError, asyncio.TimeoutError)))
            return
        if self.closed or not self.queue or self.queue[0] is not ex:
            self.proxy.give_back(conn)   # the client went away meanwhile
            return
        conn.fresh = True
        self.attach(ex, conn)

    def attach(self, ex: Exchange, conn: UpstreamConnection):
        ex.upstream = conn
        conn.begin(self, ex)
        head = self._request_head(ex)
        ex.head_sent = True
        if len(head) <= _RETAIN_LIMIT:
            ex.retained = [head]
            ex.retained_size = len(head)
        else:
            ex.retained = None
        conn.transport.write(head)
        if ex.pending:
            pending, ex.pending, ex.pending_size = ex.pending, [], 0
            for chunk in pending:
                self._write_upstream(ex, chunk)
            self.resume("buffer")

    def _request_head(self, ex: Exchange) -> bytes:
        parts = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (ex.method, ex.url, ex.host)]
        tokens = ex.conn_tokens
        if tokens and any(t not in _STANDARD_HOP for t in tokens):
            drop = {t + b":" for t in tokens}   # custom headers the client marked hop-by-hop
            parts += [p for p in ex.head_parts if p.split(b" ", 1)[0].lower() not in drop]
        else:
            parts += ex.head_parts
        parts.append(self.forwarded)
        if ex.host:
            parts.append(b"X-Forwarded-Host: %s\r\n" % ex.host)
        if ex.upgrade and b"upgrade" in tokens:
            parts.append(b"Connection: upgrade\r\nUpgrade: %s\r\n" % ex.upgrade)
        elif ex.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif ex.content_length >= 0:
            parts.append(b"Content-Length: %d\r\n" % ex.content_length)
        parts.append(b"\r\n")
        return b"".join(parts)

    def send_body(self, ex: Exchange, data: bytes):
        if ex.upstream is not None and ex.head_sent:
            self._write_upstream(ex, data)
        else:
            ex.pending.append(data)
            ex.pending_size += len(data)
            if ex.pending_size > _BUFFER_HIGH:
                self.pause("buffer")

    def _write_upstream(self, ex: Exchange, data: bytes):
        retained = ex.retained
        if retained is not None:
            size = ex.retained_size + len(data)
            if size <= _RETAIN_LIMIT:
                retained.append(data)
                ex.retained_size = size
            else:
                ex.retained = None
        ex.upstream.transport.write(data)

    def upstream_failed(self, ex: Exchange, conn: UpstreamConnection, why: str):
        """The upstream connection broke before a complete response."""
        if ex.response_started:
            log.warning("upstream %s broke mid-response: %s", ex.endpoint, why)
            ex.close_after = True
            return self.abort()
        retry = (not conn.fresh and ex.retained is not None and ex.method in _IDEMPOTENT
                 and (ex.request_done or not ex.body_size))
        ex.upstream = None
        if retry:   # a pooled connection the server had closed: try once more on a new one
            self.proxy.stats.retries += 1
            resend = ex.retained
            ex.retained, ex.retained_size = [], 0
            ex.head_sent = False
            ex.pending = resend[1:] + ex.pending
            ex.pending_size = sum(map(len, ex.pending))
            ex.tried.discard(ex.endpoint)
            return self.loop.create_task(self._open(ex, ex.endpoint))
        self.respond(ex, 502, f"upstream {ex.endpoint} {why}")

    # -- responses
    def response_head(self, ex: Exchange, status: int, head_parts: list[bytes], length: int,
                      has_server: bool):
        """Write the response head (from upstream or local). Decides client-side framing."""
        ex.status = status
        ex.response_started = True
        bodyless = ex.method == b"HEAD" or status in (204, 304) or status < 200
        keep = ex.keep_alive and not ex.close_after
        parts = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status]
        parts += head_parts
        if not has_server:
            parts.append(b"Server: " + SERVER_NAME + b"\r\n")
        if length >= 0:
            parts.append(b"Content-Length: %d\r\n" % length)
        elif not bodyless:
            if ex.version == "1.1":
                ex.client_chunked = True
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                keep = False   # HTTP/1.0: the end of the body is the end of the connection
        if status == 101:
            parts.append(b"Connection: upgrade\r\nUpgrade: %s\r\n" % ex.upgrade)
        elif not keep:
            ex.close_after = True
            parts.append(b"Connection: close\r\n")
        elif ex.version == "1.0":
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self.write(b"".join(parts))

    def write(self, data: bytes):
        if self.batch is not None:
            self.batch.append(data)
        elif not self.closed:
            self.transport.write(data)

    def flush(self):
        batch = self.batch
        if batch is not None:
            self.batch = None
            if batch and not self.closed:
                self.transport.write(b"".join(batch))

    def respond(self, ex: Exchange, status: int, reason: str):
        """A local response (404, 502, 503, ...)."""
        if ex.upstream is not None:
            ex.upstream.detach_and_abort()
            ex.upstream = None
        body = b"%d %s: %s\n" % (status, _REASONS.get(status, b"Error"), reason.encode("utf-8", "replace"))
        self.response_head(ex, status, [b"Content-Type: text/plain; charset=utf-8\r\n"], len(body), False)
        if ex.method != b"HEAD":
            self.write(body)
            ex.bytes_out += len(body)
        self.response_complete(ex)

    def redirect(self, ex: Exchange, host: str, port: int):
        authority = host if port == 443 else f"{host}:{port}"
        location = b"https://%s%s" % (authority.encode("latin-1"), ex.url)
        self.response_head(ex, 308, [b"Location: %s\r\n" % location], 0, False)
        self.response_complete(ex)

    def response_complete(self, ex: Exchange):
        ex.response_done = True
        if ex.request_done:
            self.retire(ex)
        else:
            ex.draining = True   # read and drop the rest of the request body, then go on
            ex.pending.clear()
            self.resume("buffer")

    def retire(self, ex: Exchange):
        """The exchange is over on both sides: log it, then start the next one or close."""
        proxy = self.proxy
        proxy.stats.responses[ex.status] += 1
        if proxy.access_log is not None:
            self._log_access(ex)
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        if ex.close_after:
            return self.close()
        if self.queue:
            if len(self.queue) == 1:
                self.resume("pipeline")
            self.start(self.queue[0])
        elif self.pause_reasons and "pipeline" in self.pause_reasons:
            self.resume("pipeline")

    def _log_access(self, ex: Exchange):
        route = ex.route
        self.proxy.access_log.add({
            "ts": round(time.time(), 3), "component": "ingress", "msg": "access", "client": self.client_ip,
            "method": ex.method.decode("latin-1"), "host": ex.host.decode("latin-1"),
            "path": ex.url.decode("latin-1"), "status": ex.status, "bytes": ex.bytes_out,
            "ms": round((time.monotonic() - ex.started) * 1000, 2),
            "ingress": route.ingress if route else "", "upstream": str(ex.endpoint or ""),
        })

    def fail(self, status: int, reason: str):
        """A protocol error: answer it if nothing is under way, and close the connection."""
        failing = self.incoming
        self.incoming = None
        self.pause("failed")   # read nothing more from this client
        active = self.queue[0] if self.queue else None
        if active is not None and active is not failing:
            self.queue[-1].close_after = True   # answer the requests before it, then close
            return
        ex = active or failing or Exchange(time.monotonic())
        ex.close_after = True
        self.body_expected = ex.content_length > 0 or ex.chunked is not False   # None: a bad TE
        if ex.response_started:
            return self.abort()
        ex.request_done = True
        self.respond(ex, status, reason)

    # -- upgrade
    def _start_tunnel_wait(self, rest: bytes):
        """The parser saw an Upgrade request: what follows its head is the tunnel's bytes."""
        ex = self.queue[-1] if self.queue else None
        self.incoming = None
        if ex is None or not ex.upgrade or b"upgrade" not in ex.conn_tokens:
            return self.fail(400, "bad upgrade request")
        ex.close_after = True      # after an upgrade the connection is never an HTTP one again
        if rest:
            self.send_body(ex, rest)
        self.pause("upgrade")      # hold further bytes until upstream has answered 101

    def become_tunnel(self, conn: UpstreamConnection, rest: bytes):
        self.tunnel = conn
        if rest:
            self.write(rest)
        self.resume("upgrade")

    # -- deadlines and closing
    def _watch_send(self):
        """Start the send timeout: from now on the client must keep taking our bytes."""
        self.send_since = self.loop.time()
        self.send_mark = self.transport.get_write_buffer_size()

    def check_deadline(self, now: float):
        s = self.settings
        if self.write_paused or self.flushing:
            # The send timeout: the client must take some of what waits for it within send_timeout
            # (a client that stopped reading is never held, whatever else is under way).
            waiting = self.transport.get_write_buffer_size()
            if waiting < self.send_mark:
                self.send_mark = waiting
                self.send_since = now
            elif now - self.send_since > s.send_timeout:
                return self.abort()
            if self.flushing:
                return
        idle = now - self.last_activity
        if self.tunnel is not None:
            if idle > s.tunnel_idle_timeout and now - self.tunnel.last_activity > s.tunnel_idle_timeout:
                self.abort()
            return
        ex = self.queue[0] if self.queue else None
        if ex is not None and ex.upstream is not None and not ex.response_done and not self.write_paused:
            # Silence counts from the last byte either way while the request is still streaming.
            since = ex.upstream.last_activity if ex.request_done else max(ex.upstream.last_activity,
                                                                         self.last_activity)
            if now - since > s.read_timeout:
                if ex.response_started:
                    ex.close_after = True
                    return self.abort()
                ex.close_after = True
                return self.respond(ex, 504, f"upstream {ex.endpoint} did not answer in {s.read_timeout:g}s")
        incoming = self.incoming
        if incoming is not None:
            if incoming in self.queue:   # its body: it must keep coming, no gap over the body timeout
                if not self.pause_reasons and idle > s.client_body_timeout:
                    self.fail(408, "request body not received in time")
            elif self.queue or self.pause_reasons:
                self.head_started = now   # its head's clock runs once nothing is ahead and we read
            elif now - self.head_started > s.client_header_timeout:
                # the whole head within the header timeout of its first byte, however it trickles in
                self.fail(408, "request not received in time")
        elif not self.queue and idle > s.keepalive_timeout:
            self.close()

    def close_when_done(self):
        """Stopping: answer the requests under way (the last with `Connection: close`), then close."""
        if self.queue:
            self.queue[-1].close_after = True
        else:
            self.close()

    def close(self):
        self.flush()
        if self.closed or self.transport is None or self.lingering:
            return
        if self.in_body or self.body_expected:
            return self._linger()
        self.transport.close()
        if self.write_paused or self.transport.get_write_buffer_size():
            # The transport closes once the client has taken the rest; the send timeout watches that.
            if not self.write_paused:
                self._watch_send()
            self.flushing = True

    def _linger(self):
        """Closing while the client is still sending its body: read and drop it for a while, so the
        client gets to read our answer instead of a reset (a lingering close, as nginx does)."""
        self.lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.pause_reasons.clear()
        self.transport.resume_reading()
        self.loop.call_later(_LINGER_SECONDS, self.abort)

    def abort(self):
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True


# ------------------------------------------------------------------------------------ upstream side

class UpstreamConnection(asyncio.Protocol):
    """One connection to an endpoint; serves one Exchange at a time, then goes back to the pool."""

    def __init__(self, proxy: Proxy, endpoint: Endpoint):
        self.proxy = proxy
        self.loop = proxy.loop
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.client: ClientConnection | None = None
        self.ex: Exchange | None = None
        self.closed = False
        self.fresh = False
        self.idle_since = 0.0
        self.last_activity = 0.0
        self.tunnel = False
        self.read_eof = False
        self.reading_paused = False
        self.head_parts: list[bytes] = []
        self.drop: list[bytes] = []
        self.length = -1
        self.chunked = False
        self.has_server = False
        self.reusable = True
        self.feeding = False    # inside parser.feed_data
        self.parked = False     # a response ended in the chunk being parsed: pool it once all is parsed

    def begin(self, client: ClientConnection, ex: Exchange):
        self.client = client
        self.ex = ex
        self.reusable = True
        self.last_activity = self.loop.time()
        if client.write_paused:   # the client is not taking what we have: read its answer later
            self.pause_reading()
        else:
            self.resume_reading()

    # -- asyncio callbacks
    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        ex, client = self.ex, self.client
        if self.tunnel:
            if client is not None:
                client.close()
            return
        if ex is None or client is None:
            return
        self.ex = None
        if ex.response_started and not ex.response_done and self.length < 0 and not self.chunked:
            return self._finish(ex, client)   # a close-delimited body ends with the connection
        if not ex.response_done:
            client.upstream_failed(ex, self, "closed the connection" if exc is None else str(exc))

    def data_received(self, data: bytes):
        self.last_activity = self.loop.time()
        if self.tunnel:
            self.client.write(data)
            return
        if self.ex is None:   # bytes while idle: the server is confused; do not reuse
            return self.close()
        client = self.client
        outer = client.batch is None
        if outer:
            client.batch = []
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded(data[upgrade.args[0]:])
        except httptools.HttpParserError as err:
            ex, client = self.ex, self.client
            self.ex = None
            self.abort()
            if ex is not None and not ex.response_done:
                if ex.response_started:
                    ex.close_after = True
                    client.abort()
                else:
                    client.respond(ex, 502, f"bad response from {self.endpoint}: {err}")
        finally:
            self.feeding = False
            if self.parked:
                self.parked = False
                if not self.closed:
                    self.proxy.give_back(self)
            if outer:
                client.flush()

    def pause_writing(self):
        if self.client is not None:
            self.client.pause("upstream")

    def resume_writing(self):
        if self.client is not None:
            self.client.resume("upstream")

    def eof_received(self):
        client = self.client
        if not self.tunnel or client is None or client.closed or not client.transport.can_write_eof():
            return False
        self.read_eof = True
        if client.read_eof:   # both directions finished
            client.close()
            return False
        client.transport.write_eof()
        return True

    def pause_reading(self):
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self):
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    # -- httptools callbacks (response)
    def on_message_begin(self):
        if self.ex is None:   # a message after the response: the server is confused; do not reuse
            return self.close()
        self.head_parts = []
        self.drop = []
        self.length = -1
        self.chunked = False
        self.has_server = False

    def on_header(self, name: bytes, value: bytes):
        lname = name.lower()
        if lname not in _RESPONSE_SPECIAL:
            self.head_parts.append(b"%s: %s\r\n" % (name, value))
        elif lname == b"content-length":
            self.length = int(value)
        elif lname == b"transfer-encoding":
            self.chunked = True
        elif lname == b"server":
            self.has_server = True
            self.head_parts.append(b"%s: %s\r\n" % (name, value))
        elif lname == b"connection":
            value = value.lower()
            if value == b"keep-alive":   # the usual one: nothing to do
                return
            tokens = [t.strip() for t in value.split(b",")]
            if b"close" in tokens:
                self.reusable = False
            self.drop += [t + b":" for t in tokens if t not in _STANDARD_HOP]

    def on_headers_complete(self):
        status = self.parser.get_status_code()
        ex, client = self.ex, self.client
        if ex is None:
            return
        if self.drop:   # headers the upstream marked hop-by-hop in its Connection header
            self.head_parts = [p for p in self.head_parts if p.split(b" ", 1)[0].lower() not in self.drop]
        if 100 <= status < 200 and status != 101:   # interim (100 Continue): pass it on as is
            client.write(b"%s\r\n" % (_STATUS_LINES.get(status, b"HTTP/1.1 %d \r\n" % status)[:-2])
                         + b"".join(self.head_parts) + b"\r\n")
            return
        if status == 101:
            if not ex.upgrade or b"upgrade" not in ex.conn_tokens:
                # A server must not switch to a protocol the client did not ask for (RFC 9110 15.2.2).
                self.ex = None
                self.abort()
                return client.respond(ex, 502, f"bad response from {self.endpoint}: 101 to a request "
                                               "that asked for no upgrade")
            ex.status = 101
            return   # the head is sent when the parser reports the upgrade
        if ex.method == b"HEAD":
            # No body follows, whatever the headers say. httptools cannot be told so, so the
            # response ends here and this connection is not reused (its parser would wait for one).
            if self.length >= 0:
                self.head_parts.append(b"Content-Length: %d\r\n" % self.length)
            client.response_head(ex, status, self.head_parts, -1, self.has_server)
            self.reusable = False
            return self._finish(ex, client)
        length = -1 if self.chunked else self.length
        client.response_head(ex, status, self.head_parts, length, self.has_server)

    def on_body(self, body: bytes):
        ex = self.ex
        if ex is None:
            return
        ex.bytes_out += len(body)
        if ex.client_chunked:
            self.client.write(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self.client.write(body)

    def on_message_complete(self):
        ex = self.ex
        if ex is None or not ex.response_started:   # the end of an interim response
            return
        self._finish(ex, self.client)

    def _finish(self, ex: Exchange, client: ClientConnection):
        if ex.client_chunked:
            client.write(b"0\r\n\r\n")
        self.ex = None
        self.client = None
        if (self.reusable and ex.request_done and not self.closed
                and self.parser.should_keep_alive()):
            if self.feeding:
                # Not yet: bytes after the response in this chunk (a server's junk) would be read as
                # the answer to whichever request took this connection next.
                self.parked = True
            else:
                self.proxy.give_back(self)
        else:
            self.close()
        ex.upstream = None
        client.response_complete(ex)

    # -- upgrade
    def _upgraded(self, rest: bytes):
        ex, client = self.ex, self.client
        if ex is None or ex.status != 101:
            return self.abort()
        client.response_head(ex, 101, self.head_parts, -1, self.has_server)
        self.tunnel = True
        client.become_tunnel(self, rest)

    # -- closing
    def detach_and_abort(self):
        self.ex = None
        self.client = None
        self.abort()

    def close(self):
        if not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self):
        if not self.closed:
            self.closed = True
            self.transport.abort()
