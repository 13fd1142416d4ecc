"""`netplane ingress ...`: the ingress HTTP proxy.

    netplane ingress serve --objects FILE --listen ADDR:PORT [--tls-listen ADDR:PORT] [--workers N]
    netplane ingress serve [--server URL] --listen 0.0.0.0:80 [--health-listen ADDR:PORT] [--workers N]
    netplane ingress routes --objects FILE      # print the route table the objects give

Offline (--objects) the route table comes from a YAML file of Ingresses, Services, EndpointSlices,
IngressClasses and Secrets. Live (no --objects) it watches those kinds on the API server (--server,
default $NETPLANE_SERVER), rebuilds the table on change (coalesced, at most every 0.1 s) and swaps it
in without touching open connections; /healthz answers 200 once the first table is built.
With --workers N > 1 a supervisor starts N worker processes that share the ports with SO_REUSEPORT.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import sys

from netplane import daemon
from netplane.daemon import log_fields, split_hostport
from netplane.ingress.proxy import ClientConnection, Proxy, Settings
from netplane.ingress.routes import (OUR_CLASS, OUR_CONTROLLER, ClassPolicy, Objects, RouteTable, published_status,
                                     build_table)

log = logging.getLogger("ingress")

WATCHED_KINDS = ("Ingress", "Service", "EndpointSlice", "IngressClass", "Secret")


# ------------------------------------------------------------------------------------ arguments

def _size(text: str) -> int:
    """'1m' -> 1048576; '0' -> 0 (no limit)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (like 512k, 1m, 1g or 0)") from None


def _address(text: str) -> str:
    try:
        split_hostport(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netplane ingress", description="the ingress HTTP proxy")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="route HTTP by host and path to Service endpoints")
    serve.add_argument("--objects", metavar="FILE", help="YAML objects to route from (offline mode)")
    serve.add_argument("--server", metavar="URL", help="API server (default $NETPLANE_SERVER)")
    serve.add_argument("--listen", type=_address, default="0.0.0.0:80", metavar="ADDR:PORT")
    serve.add_argument("--tls-listen", type=_address, metavar="ADDR:PORT",
                       help="terminate TLS here with certificates from kubernetes.io/tls Secrets")
    serve.add_argument("--health-listen", type=_address, metavar="ADDR:PORT",
                       help="serve /healthz (200 once routes are synced) and /metrics here")
    serve.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="worker processes sharing the ports with SO_REUSEPORT (default: one per core)")
    serve.add_argument("--ingress-class", default=OUR_CLASS, help=f"our IngressClass name (default {OUR_CLASS})")
    serve.add_argument("--controller", default=OUR_CONTROLLER,
                       help=f"our IngressClass spec.controller (default {OUR_CONTROLLER})")
    serve.add_argument("--default-certificate", nargs=2, metavar=("CERT", "KEY"),
                       help="PEM files for TLS names no Secret covers (default: a self-signed one)")
    serve.add_argument("--ssl-redirect", action="store_true",
                       help="answer plain HTTP for hosts that have a certificate with 308 to https")
    serve.add_argument("--connect-timeout", type=float, default=Settings.connect_timeout, metavar="S")
    serve.add_argument("--read-timeout", type=float, default=Settings.read_timeout, metavar="S",
                       help="upstream silent this long: 504 (default %(default)s)")
    serve.add_argument("--client-timeout", type=float, default=Settings.client_header_timeout, metavar="S",
                       help="a client slower than this sending a request head or body gets 408")
    serve.add_argument("--send-timeout", type=float, default=Settings.send_timeout, metavar="S",
                       help="a client that takes none of our response bytes for this long is "
                            "disconnected (default %(default)s)")
    serve.add_argument("--keepalive-timeout", type=float, default=Settings.keepalive_timeout, metavar="S")
    serve.add_argument("--max-header-size", type=_size, default=Settings.max_header_bytes,
                       help="request line + headers over this: 431 (default 32k)")
    serve.add_argument("--max-body-size", type=_size, default=Settings.max_body_bytes,
                       help="request body over this: 413 (default 0 = no limit; bodies are streamed)")
    serve.add_argument("--no-access-log", action="store_true", help="do not log each request")
    serve.add_argument("--publish-service", metavar="NAMESPACE/NAME",
                       help="write this Service's load-balancer addresses into the status of the Ingresses "
                            "we serve (kubectl get ingress: ADDRESS), as ingress-nginx does")
    serve.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)   # set by the supervisor
    routes = sub.add_parser("routes", help="print the route table the objects give")
    routes.add_argument("--objects", metavar="FILE", required=True)
    routes.add_argument("--ingress-class", default=OUR_CLASS)
    routes.add_argument("--controller", default=OUR_CONTROLLER)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(connect_timeout=args.connect_timeout, read_timeout=args.read_timeout,
                    client_header_timeout=args.client_timeout, client_body_timeout=args.client_timeout,
                    send_timeout=args.send_timeout, keepalive_timeout=args.keepalive_timeout,
                    max_header_bytes=args.max_header_size, max_body_bytes=args.max_body_size,
                    access_log=not args.no_access_log)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command == "routes":
        return print_routes(args)
    if args.workers < 1:
        print("netplane ingress: --workers must be at least 1", file=sys.stderr)
        return 2
    daemon.setup_logging("ingress")
    if args.publish_service and (args.objects or "/" not in args.publish_service):
        print("netplane ingress: --publish-service takes NAMESPACE/NAME and needs the API server "
              "(not --objects)", file=sys.stderr)
        return 2
    if args.objects:
        from netplane.objects import ManifestError, load_file
        try:
            args.loaded = load_file(args.objects)
        except ManifestError as err:
            print(f"netplane ingress: {err}", file=sys.stderr)
            return 2
    if args.workers > 1 and args.ready_fd is None:
        from netplane.ingress.workers import supervise
        return supervise(args, argv)
    state = WorkerState()
    health = None if args.ready_fd is not None else args.health_listen
    try:
        return daemon.run(lambda stop: serve_worker(args, stop, state), "ingress", health, state.health)
    except OSError as err:
        print(f"netplane ingress: cannot listen: {err}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------------------------ one worker

class WorkerState:
    def __init__(self):
        self.ready = False
        self.last_problems: tuple[str, ...] = ()

    def health(self) -> tuple[bool, str]:
        return (True, "ok: routes synced") if self.ready else (False, "waiting for the first route table")


class TableSync:
    """Rebuild the table from the view and swap it into the proxy (and the TLS store)."""

    def __init__(self, view, proxy: Proxy, policy: ClassPolicy, certificates, state: WorkerState,
                 publish: tuple[str, str] | None = None):
        self.view = view
        self.publish = publish   # (namespace, name) of our Service, or None
        self.proxy = proxy
        self.policy = policy
        self.certificates = certificates
        self.state = state

    def objects(self) -> Objects:
        return Objects(*(tuple(self.view.list(kind)) for kind in WATCHED_KINDS))

    def rebuild(self) -> RouteTable:
        table = build_table(self.objects(), self.policy)
        problems = list(table.problems)
        if self.certificates is not None:
            problems += self.certificates.update(table)
        self.proxy.swap_table(table)
        if tuple(problems) != self.state.last_problems:   # say each problem once, not per rebuild
            for problem in problems:
                log_fields(log, logging.WARNING, "skipped", problem=problem)
            self.state.last_problems = tuple(problems)
        log_fields(log, logging.INFO, "routes", ingresses=len(table.ingresses),
                   hosts=len(table.exact_hosts) + len(table.wildcard_hosts), certificates=len(table.certificates))
        return table

    async def run(self) -> None:
        table = self.rebuild()
        if self.publish is not None:
            await self.publish_status(table)

    async def publish_status(self, table: RouteTable) -> None:
        """Our Service's addresses into the status of the Ingresses we serve (routes.published_status)."""
        from netplane.client import APIError
        namespace, name = self.publish
        service = self.view.get("Service", namespace, name)
        for ing_namespace, ing_name, status in published_status(self.view.list("Ingress"), table.ingresses, service):
            try:
                await self.view.client.patch("Ingress", ing_name, {"status": status}, ing_namespace, "status")
                log_fields(log, logging.INFO, "ingress status", ingress=f"{ing_namespace}/{ing_name}",
                           addresses=status["loadBalancer"]["ingress"])
            except APIError as err:
                log_fields(log, logging.WARNING, "ingress status not written", ingress=f"{ing_namespace}/{ing_name}",
                           error=str(err))


def make_view(args):
    from netplane.client import Client, FileView, WatchView, resolve_server
    if args.objects:
        return FileView(args.loaded)
    return WatchView(Client(resolve_server(args.server)), WATCHED_KINDS)


def default_certificate(args) -> tuple[bytes, bytes]:
    from netplane.ingress import tls
    if args.default_certificate:
        cert, key = args.default_certificate
        with open(cert, "rb") as c, open(key, "rb") as k:
            return c.read(), k.read()
    return tls.self_signed()


async def serve_worker(args, stop: asyncio.Event, state: WorkerState) -> None:
    loop = asyncio.get_running_loop()
    view = make_view(args)
    await view.start()
    servers = []
    proxy = None
    try:
        synced = asyncio.ensure_future(view.wait_synced())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([synced, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if stop.is_set():
            synced.cancel()
            return
        proxy = Proxy(RouteTable(), settings_from(args))
        proxy.ssl_redirect_port = split_hostport(args.tls_listen)[1] if args.ssl_redirect and args.tls_listen else 0
        certificates = None
        if args.tls_listen:
            from netplane.ingress.tls import CertificateStore
            certificates = CertificateStore(default_certificate(args))
        publish = tuple(args.publish_service.split("/", 1)) if args.publish_service else None
        sync = TableSync(view, proxy, ClassPolicy(args.ingress_class, args.controller), certificates, state, publish)
        sync.rebuild()
        from netplane.client import CoalescingRunner
        runner = CoalescingRunner(sync.run, min_interval=0.1)
        view.add_listener(runner.request)
        servers = await open_listeners(loop, proxy, args, certificates)
        proxy.start_sweeper()
        register_metrics(proxy.stats.snapshot)
        # The startup heap (modules, the first table) is never garbage; a full collection walking
        # it stalls every connection for ~10 ms (a p99 spike), so move it out of the collector's way.
        gc.collect()
        gc.freeze()
        state.ready = True
        announce_ready(args)
        if args.ready_fd is not None:
            reporter = asyncio.ensure_future(report_stats(args, proxy, stop))
        await runner.run(stop)
        if args.ready_fd is not None:
            await reporter  # one last report as the worker stops
    finally:
        for server in servers:
            server.close()
        if proxy is not None:
            await drain(proxy, grace=5.0)
            proxy.stop()
        await view.stop()


async def open_listeners(loop, proxy: Proxy, args, certificates) -> list:
    reuse_port = args.ready_fd is not None   # workers of a pool share each port
    servers = []
    host, port = split_hostport(args.listen)
    servers.append(await loop.create_server(lambda: ClientConnection(proxy, b"http", port), host or None,
                                            port, reuse_address=True, reuse_port=reuse_port, backlog=2048))
    log_fields(log, logging.INFO, "listening", address=args.listen, scheme="http")
    if args.tls_listen:
        tls_host, tls_port = split_hostport(args.tls_listen)
        servers.append(await loop.create_server(
            lambda: ClientConnection(proxy, b"https", tls_port), tls_host or None, tls_port,
            ssl=certificates.default, reuse_address=True, reuse_port=reuse_port, backlog=2048))
        log_fields(log, logging.INFO, "listening", address=args.tls_listen, scheme="https")
    return servers


async def drain(proxy: Proxy, grace: float) -> None:
    """After the listeners close: idle connections close at once, the others after answering what is
    under way (the last answer says `Connection: close`); whatever is left after `grace` is closed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    for client in list(proxy.clients):
        client.close_when_done()
    while any(c.queue for c in proxy.clients) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for client in list(proxy.clients):
        client.close()


def announce_ready(args) -> None:
    if args.ready_fd is not None:
        try:
            os.write(args.ready_fd, b"ready\n")
        except OSError:
            pass


COUNTER_HELP = {
    "upstream_connects": "Upstream connections opened",
    "upstream_connect_failures": "Upstream connects that failed",
    "upstream_reused": "Requests sent on a pooled upstream connection",
    "retries": "Requests retried on another connection or endpoint",
    "table_swaps": "Route tables swapped in",
}


def register_metrics(snapshot) -> None:
    """Export `snapshot()` (Stats.snapshot's shape: one process's, or the sum over the workers)."""
    from prometheus_client import REGISTRY
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class StatsCollector:
        def collect(self):
            stats = snapshot()
            responses = CounterMetricFamily("netplane_ingress_responses", "Responses sent, by status code",
                                            labels=["code"])
            for code, count in sorted(stats["responses"].items()):
                responses.add_metric([code], count)
            yield responses
            for name, help_ in COUNTER_HELP.items():
                yield CounterMetricFamily(f"netplane_ingress_{name}", help_, value=stats[name])
            yield GaugeMetricFamily("netplane_ingress_open_connections", "Client connections open",
                                    value=stats["open_connections"])

    REGISTRY.register(StatsCollector())


async def report_stats(args, proxy: Proxy, stop: asyncio.Event, interval: float = 1.0) -> None:
    """A pool worker: send the supervisor our counters every `interval`, on the ready pipe."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass
        try:
            os.write(args.ready_fd, b"stats " + json.dumps(proxy.stats.snapshot()).encode() + b"\n")
        except OSError:
            return  # the supervisor is gone


# ------------------------------------------------------------------------------------ routes

def print_routes(args) -> int:
    from netplane.objects import ManifestError, load_file
    try:
        objects = Objects.from_list(load_file(args.objects))
    except ManifestError as err:
        print(f"netplane ingress: {err}", file=sys.stderr)
        return 2
    table = build_table(objects, ClassPolicy(args.ingress_class, args.controller))
    print(describe(table))
    return 0


def describe(table: RouteTable) -> str:
    lines = []
    groups = [(h, v) for h, v in sorted(table.exact_hosts.items())]
    groups += [("*." + h, v) for h, v in sorted(table.wildcard_hosts.items())]
    if table.any_host:
        groups.append(("(any host)", table.any_host))
    for host, vhost in groups:
        lines.append(host)
        entries = [(p, "Exact", r) for p, r in vhost.exact.items()]
        entries += [(p or "/", "Prefix", r) for p, r in vhost.prefix.items()]
        entries += [(p, "String", r) for p, r in vhost.plain.items()]   # ImplementationSpecific
        for path, kind, route in sorted(entries, key=lambda e: (-len(e[0]), e[1] != "Exact")):
            backend = route.backend
            target = (", ".join(map(str, backend.endpoints)) if backend.usable
                      else f"503 ({backend.problem or 'no ready endpoints'})")
            lines.append(f"  {kind:<6} {path:<24} -> {backend.service:<32} {target}   [{route.ingress}]")
    default = table.default_route
    lines.append("default: " + (f"{default.backend.service} [{default.ingress}]" if default.backend else "404"))
    for host, cert in sorted(table.certificates.items()):
        lines.append(f"tls: {host} <- secret {cert.secret}")
    for problem in table.problems:
        lines.append(f"skipped: {problem}")
    return "\n".join(lines)
