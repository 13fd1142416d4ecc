"""`netplane dns serve`: the cluster DNS server, offline from a file of objects or live from the API.

    netplane dns serve --objects FILE --listen ADDR:PORT [--zone Z] [--upstream ADDR:PORT]...
    netplane dns serve --server URL --listen 0.0.0.0:53 [--zone Z]   (--server defaults to $NETPLANE_SERVER)

Live mode watches Services, EndpointSlices and Namespaces; every change marks the zone dirty and a
coalescing runner rebuilds it (at most every 100 ms) and swaps it in. Until the first sync the server
answers SERVFAIL for cluster names, never a false NXDOMAIN.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from netplane import daemon
from netplane.daemon import log_fields, split_hostport

log = logging.getLogger("dns")

WATCHED_KINDS = ("Service", "EndpointSlice", "Namespace")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netplane dns", description="the cluster DNS server")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="answer DNS for the cluster zone; forward other names")
    source = serve.add_mutually_exclusive_group()
    source.add_argument("--objects", metavar="FILE", help="offline: YAML file of Services/EndpointSlices")
    source.add_argument("--server", metavar="URL", default=None,
                        help="API server to watch (default: $NETPLANE_SERVER)")
    serve.add_argument("--listen", metavar="ADDR:PORT", default="0.0.0.0:53", help="UDP and TCP address")
    serve.add_argument("--zone", default="cluster.local", help="the cluster domain (default cluster.local)")
    serve.add_argument("--ttl", type=int, default=5, help="TTL of cluster answers, 0-3600 (default 5)")
    serve.add_argument("--upstream", metavar="ADDR[:PORT]|FILE", action="append", default=[],
                       help="forward other names here (repeat for fail-over; a resolv.conf path reads "
                            "its nameservers); without it, other names are REFUSED")
    serve.add_argument("--pods", choices=["disabled", "insecure"], default="disabled",
                       help="pod records a-b-c-d.<ns>.pod.<zone> (CoreDNS `pods`; default disabled)")
    serve.add_argument("--forward-timeout", type=float, default=2.0, help="seconds per upstream attempt")
    serve.add_argument("--cache-size", type=int, default=10000, help="forwarded answers kept in the cache")
    serve.add_argument("--workers", type=int, default=1,
                       help="processes sharing the port (SO_REUSEPORT), for more than one CPU (default 1)")
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set for workers
    serve.add_argument("--health-listen", metavar="ADDR:PORT", default=None,
                       help="serve /healthz, /ready and /metrics here (default: off)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def parse_upstreams(values: list[str]) -> list[tuple[str, int]]:
    """--upstream values: 'ADDR', 'ADDR:PORT', '[V6]:PORT', or a resolv.conf-style file."""
    upstreams = []
    for value in values:
        if "/" in value:
            try:
                lines = Path(value).read_text().splitlines()
            except OSError as err:
                raise ValueError(f"--upstream {value}: cannot read: {err.strerror}") from None
            found = [line.split()[1] for line in lines if line.split()[:1] == ["nameserver"] and len(line.split()) > 1]
            if not found:
                raise ValueError(f"--upstream {value}: no 'nameserver' lines")
            upstreams += [(host, 53) for host in found]
            continue
        try:
            host, port = split_hostport(value, 53) if value.count(":") <= 1 or value.startswith("[") \
                else (value, 53)
        except ValueError:
            raise ValueError(f"--upstream {value!r}: expected ADDR[:PORT]") from None
        if not host or not 0 < port < 65536:
            raise ValueError(f"--upstream {value!r}: expected ADDR[:PORT]")
        upstreams.append((host, port))
    return upstreams


def check_args(args) -> str | None:
    """The error message for unusable flags, or None."""
    if not args.objects and not args.server:
        return ("give --objects FILE (offline) or --server URL / $NETPLANE_SERVER "
                "(watch the API server)")
    if not 1 <= args.workers <= 64:
        return f"--workers {args.workers}: must be between 1 and 64"
    if not 0 <= args.ttl <= 3600:
        return f"--ttl {args.ttl}: must be between 0 and 3600"
    if args.cache_size < 0:
        return f"--cache-size {args.cache_size}: must be 0 (no cache) or more"
    if not args.forward_timeout > 0:
        return f"--forward-timeout {args.forward_timeout}: must be more than 0 seconds"
    for flag, value in (("--listen", args.listen), ("--health-listen", args.health_listen)):
        if value:
            try:
                split_hostport(value)
            except ValueError:
                return f"{flag} {value!r}: expected ADDR:PORT"
    zone = args.zone.strip(".")
    if not zone or any(not label or len(label) > 63 for label in zone.split(".")):
        return f"--zone {args.zone!r}: not a domain name"
    return None


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    args.argv = list(argv)
    if args.server is None and not args.objects:
        args.server = os.environ.get("NETPLANE_SERVER") or None
    error = check_args(args)
    try:
        args.upstreams = parse_upstreams(args.upstream)
    except ValueError as err:
        error = error or str(err)
    if error:
        print(f"netplane dns serve: {error}", file=sys.stderr)
        return 2
    daemon.setup_logging("dns", getattr(logging, args.log_level.upper()))
    if args.objects:
        from netplane.objects import ManifestError, load_file
        try:
            args.loaded = load_file(args.objects)
        except ManifestError as err:
            print(f"netplane dns serve: {err}", file=sys.stderr)
            return 2
    failed = []

    async def run(stop: asyncio.Event) -> None:
        try:
            await serve(args, stop)
        except OSError as err:  # cannot bind, mostly: say which address and exit non-zero
            log_fields(log, logging.ERROR, "cannot serve", listen=args.listen, error=str(err))
            failed.append(err)

    daemon.run(run, component="dns")
    return 1 if failed else 0


async def serve(args, stop: asyncio.Event) -> None:
    from netplane.client import CoalescingRunner
    from netplane.dns import wire
    from netplane.dns.forward import Forwarder
    from netplane.dns.metrics import DnsMetrics
    from netplane.dns.server import DnsServer
    from netplane.dns.zone import unsynced_zone

    origin = args.zone.lower().strip(".")
    metrics = DnsMetrics()
    forwarder = Forwarder(args.upstreams, args.forward_timeout, args.cache_size, metrics) if args.upstreams else None
    server = DnsServer(wire.Table(unsynced_zone(origin, args.ttl)), forwarder, metrics)
    view = _view(args)
    zone_sync = _ZoneSync(server, view, origin, args.ttl, args.pods)
    runner = CoalescingRunner(zone_sync.sync, min_interval=0.1)
    view.add_listener(runner.request)
    async with contextlib.AsyncExitStack() as cleanup:
        cleanup.push_async_callback(server.stop)
        cleanup.push_async_callback(view.stop)
        if hasattr(view, "client"):
            cleanup.push_async_callback(view.client.close)
        await view.start()
        if view.is_synced():  # a file: answer from the first packet on, no SERVFAIL window
            await zone_sync.sync()
        host, port = split_hostport(args.listen)
        bound = await server.start(host, port, reuse_port=args.reuse_port or args.workers > 1)
        if args.workers > 1:
            cleanup.callback(_stop_workers, _start_workers(args, bound[1]))
        health_at = None
        if args.health_listen:
            health = await _serve_health(args.health_listen, server, metrics)
            cleanup.push_async_callback(health.cleanup)
            health_at = "%s:%s" % tuple(health.addresses[0][:2])
        log_fields(log, logging.INFO, "listening", udp_tcp=f"{bound[0]}:{bound[1]}", zone=origin,
                   health=health_at, upstreams=[f"{h}:{p}" for h, p in args.upstreams],
                   source=args.objects or args.server)
        runner.request()
        await runner.run(stop)


def _start_workers(args, port: int) -> list:
    """The other workers: this same command on the bound port, without health or further workers
    (each builds its own zone; /metrics shows the first worker's share)."""
    import subprocess
    argv, skip = [], False
    for arg in args.argv:
        if skip:
            skip = False
        elif arg in ("--workers", "--listen", "--health-listen"):
            skip = True
        elif not arg.startswith(("--workers=", "--listen=", "--health-listen=")):
            argv.append(arg)
    host = split_hostport(args.listen)[0]
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return [subprocess.Popen([sys.executable, "-m", "netplane", "dns", *argv, "--listen", listen, "--reuse-port"])
            for _ in range(args.workers - 1)]


def _stop_workers(workers: list) -> None:
    for worker in workers:
        worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=10)
        except Exception:
            worker.kill()


def _view(args):
    from netplane.client import Client, FileView, WatchView
    if args.objects:
        return FileView(args.loaded)
    return WatchView(Client(args.server.rstrip("/")), list(WATCHED_KINDS))


async def _serve_health(listen: str, server, metrics):
    from aiohttp import web
    from prometheus_client import REGISTRY

    REGISTRY.register(metrics)

    async def ready(_request):
        synced = server.table.zone.synced
        return web.Response(status=200 if synced else 503, text="ok\n" if synced else "zone not synced\n")

    def routes(app):
        app.router.add_get("/ready", ready)

    return await daemon.serve_health(listen, lambda: (True, "ok"), routes)


class _ZoneSync:
    """Rebuild the zone from the view's current objects and swap it in (the runner coalesces)."""

    def __init__(self, server, view, origin: str, ttl: int, pods: str):
        self.server, self.view, self.origin, self.ttl, self.pods = server, view, origin, ttl, pods
        # One serial for the server's life: a serial in every negative answer that changed with
        # each rebuild would force re-encoding them all (CoreDNS bumps it; nothing here needs that).
        self.serial = int(time.time())
        self.reported: set[str] = set()

    async def sync(self) -> None:
        if not self.view.is_synced():
            return  # never build from a partial picture: keep SERVFAIL until every kind is listed
        objects = [obj for kind in WATCHED_KINDS for obj in self.view.list(kind)]
        started = time.monotonic()
        table, skipped = await asyncio.get_running_loop().run_in_executor(
            None, build_table, objects, self.origin, self.ttl, self.serial, self.pods, self.server.table)
        self.server.table = table
        self.server.metrics.zone_builds += 1
        self.server.metrics.zone_names = len(table.zone.nodes)
        for reason in skipped:
            if reason not in self.reported:
                log_fields(log, logging.WARNING, "object skipped", reason=reason)
        self.reported = set(skipped)
        log_fields(log, logging.INFO, "zone built", names=len(table.zone.nodes), kept_answers=table.size,
                   ms=round((time.monotonic() - started) * 1000, 1))


def build_table(objects: list[dict], origin: str, ttl: int, serial: int, pods: str = "disabled",
                previous=None):
    """Objects -> (Table, skipped-object reasons); the Table keeps `previous`'s unchanged answers.
    Pure apart from reading `previous`; runs in a worker thread."""
    from netplane.dns import model, wire, zone
    views = model.from_objects(objects)
    return wire.Table(zone.build_zone(views, origin, ttl, serial, pods), previous), views.skipped
