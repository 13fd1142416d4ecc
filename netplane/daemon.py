"""What every netplane daemon shares: structured logs, /metrics and /healthz, clean SIGTERM.

    async def main(stop: asyncio.Event):
        await stop.wait()
    run(main, component="proxy", health_listen="127.0.0.1:10256", healthy=lambda: (True, "ok"))
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from typing import Awaitable, Callable

HealthCheck = Callable[[], tuple[bool, str]]


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str):
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "component": self.component,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(component: str, level: int = logging.INFO) -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return logging.getLogger(component)


def log_fields(logger: logging.Logger, level: int, msg: str, **fields) -> None:
    """Log `msg` with extra structured fields: log_fields(log, logging.INFO, "synced", rules=12)."""
    logger.log(level, msg, extra={"fields": fields})


def split_hostport(addr: str, default_port: int | None = None) -> tuple[str, int]:
    """'127.0.0.1:53' -> ('127.0.0.1', 53); '[::1]:53' -> ('::1', 53)."""
    if addr.startswith("["):
        host, _, port = addr[1:].partition("]:")
    else:
        host, sep, port = addr.rpartition(":")
        if not sep:
            host, port = addr, ""
    if not port:
        if default_port is None:
            raise ValueError(f"address {addr!r} has no port")
        return host, default_port
    return host, int(port)


async def serve_health(listen: str, healthy: HealthCheck | None = None,
                       extra_routes: Callable | None = None):
    """Serve /healthz, /readyz and /metrics (prometheus_client's default registry) on `listen`.

    Returns the aiohttp AppRunner; call `await runner.cleanup()` on shutdown.
    """
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def healthz(_request):
        ok, why = healthy() if healthy else (True, "ok")
        return web.Response(status=200 if ok else 503, text=why + "\n")

    async def metrics(_request):
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", healthz)
    app.router.add_get("/metrics", metrics)
    if extra_routes:
        extra_routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = split_hostport(listen)
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner


def run(main: Callable[[asyncio.Event], Awaitable[None]], component: str,
        health_listen: str | None = None, healthy: HealthCheck | None = None,
        extra_routes: Callable | None = None) -> int:
    """Run `main(stop)` on uvloop until it returns or SIGTERM/SIGINT sets `stop`; `extra_routes(app)`
    adds the daemon's own endpoints to its health server."""
    log = logging.getLogger(component)
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        pass

    async def wrapper() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner = await serve_health(health_listen, healthy, extra_routes) if health_listen else None
        started = time.monotonic()
        log_fields(log, logging.INFO, "started", health=health_listen)
        try:
            await main(stop)
        finally:
            if runner:
                await runner.cleanup()
            log_fields(log, logging.INFO, "stopped", uptime_s=round(time.monotonic() - started, 1))

    asyncio.run(wrapper())
    return 0


def run_client_daemon(make: Callable, server: str, component: str, health_listen: str | None,
                      health_of: Callable, add_routes: Callable | None = None) -> int:
    """`run` for a daemon object that talks to the API server: `make(client)` builds it (its
    `run(stop)` is the main loop) and `health_of(it)` answers /healthz once it exists;
    `add_routes(app, it_or_none)` adds endpoints whose handlers call it_or_none() for the object."""
    made: list = []

    async def main(stop: asyncio.Event) -> None:
        from netplane.client import Client
        client = Client(server)
        made.append(make(client))
        try:
            await made[0].run(stop)
        finally:
            await client.close()

    def healthy() -> tuple[bool, str]:
        return health_of(made[0]) if made else (False, "starting")

    extra = (lambda app: add_routes(app, lambda: made[0] if made else None)) if add_routes else None
    return run(main, component, health_listen, healthy, extra)
