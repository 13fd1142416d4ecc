"""Lab mode: follow Services and EndpointSlices on the API server and keep the rules in sync.

Level-triggered and coalesced: a watch event only marks the state dirty; the runner renders the
whole model from the watch cache at most every min-sync-interval and applies it (a full table
on the first sync and after any failure, only what changed otherwise). Nothing is programmed
until both kinds have synced (never from partial state). A failed apply leaves the old rules in
the kernel and is retried, as a full sync. Bad objects are reported once each, never crash the daemon.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import time

from prometheus_client import Counter, Gauge, Histogram

from netplane import daemon
from netplane.client import tracker_for
from netplane.proxy import conntrack
from netplane.proxy.model import HealthCheck, Model, ModelBuilder, NodeFacts, health_checks

log = logging.getLogger("proxy")

SYNC_SECONDS = Histogram("netplane_proxy_sync_duration_seconds", "Time to render and apply the rules",
                         ["kind"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
SYNC_FAILURES = Counter("netplane_proxy_sync_failures_total", "Applies that failed (old rules kept)")
LAST_SYNC = Gauge("netplane_proxy_last_sync_timestamp_seconds", "Unix time of the last successful sync")
SERVICES = Gauge("netplane_proxy_services_programmed", "Service ports programmed")
RULES = Gauge("netplane_proxy_rules_programmed", "Rules programmed")
CHAINS = Gauge("netplane_proxy_chains_programmed", "Chains programmed")
BAD_OBJECTS = Gauge("netplane_proxy_bad_objects", "Objects skipped because they cannot be used")
CONNTRACK_DELETED = Counter("netplane_proxy_conntrack_entries_deleted_total",
                            "Stale UDP conntrack entries deleted")

STALE_AFTER = 30.0  # seconds a change may wait for a sync before /healthz reports unhealthy


class Proxier:
    def __init__(self, view, node: NodeFacts, backend, clean_conntrack: bool = True,
                 clock=time.monotonic, health_servers: "HealthCheckServers | None" = None):
        self.view = view
        self.node = node
        # Only what changed since the last sync is handed to the builder, which converts only
        # that (kube-proxy's change trackers): a sync costs O(changed), not O(all objects).
        self.trackers = {kind: tracker_for(view, kind) for kind in ("Service", "EndpointSlice")}
        self.builder = ModelBuilder(node)
        self.health_servers = health_servers
        self.backend = backend
        self.clean_conntrack = clean_conntrack
        self.clock = clock
        self.pending_since: float | None = None  # oldest change not yet programmed
        self.synced_once = False
        self.force_full = False  # the last apply failed: the next one replaces the whole table
        self.reported_errors: set[str] = set()

    def on_change(self) -> None:
        if self.pending_since is None:
            self.pending_since = self.clock()

    def model(self) -> Model:
        """The whole model now, taking the changes recorded since the last call."""
        return self.builder.update(self.trackers["Service"].take(), self.trackers["EndpointSlice"].take())

    def _report(self, model: Model) -> None:
        errors = set(model.errors)
        for error in sorted(errors - self.reported_errors):
            daemon.log_fields(log, logging.WARNING, "skipping bad object", error=error)
        self.reported_errors = errors
        BAD_OBJECTS.set(len(errors))

    def _view_synced(self) -> bool:
        is_synced = getattr(self.view, "is_synced", None)
        return is_synced() if is_synced is not None else True

    async def sync(self) -> None:
        if not self._view_synced():
            # Never program from partial state: a Service listed before its EndpointSlices
            # would be rendered as having no endpoints (REJECT). The change stays pending.
            if self.pending_since is None:
                self.pending_since = self.clock()
            daemon.log_fields(log, logging.INFO, "caches not synced yet; not programming")
            return
        claimed, self.pending_since = self.pending_since, None
        started = time.monotonic()
        model = self.model()
        self._report(model)
        try:
            result = await asyncio.to_thread(self.backend.sync, model, self.force_full)
        except Exception:
            SYNC_FAILURES.inc()
            self.force_full = True  # we no longer know exactly what the kernel holds
            if claimed is not None:
                self.pending_since = claimed if self.pending_since is None else min(claimed, self.pending_since)
            elif self.pending_since is None:
                self.pending_since = self.clock()
            raise  # the runner logs it and retries; the retry is a full sync (force_full)
        self.force_full = False
        elapsed = time.monotonic() - started
        SYNC_SECONDS.labels("full" if result.full else "partial").observe(elapsed)
        LAST_SYNC.set(time.time())
        SERVICES.set(result.services)
        RULES.set(result.rules)
        CHAINS.set(result.chains)
        self.synced_once = True
        daemon.log_fields(log, logging.INFO, "synced", full=result.full, services=result.services,
                          rules=result.rules, bytes=result.bytes, seconds=round(elapsed, 4))
        if result.full:
            # The watch cache's objects and the rendered rules live long: keep the cyclic
            # collector from walking a million of them again on every full collection (a
            # 0.5 s pause at 10,000 Services, in the middle of a partial sync).
            gc.freeze()
        if self.health_servers is not None:
            await self.health_servers.update(health_checks(model))
        if self.clean_conntrack and (result.full or conntrack.udp_changed(model)):
            deleted = await asyncio.to_thread(conntrack.clean_stale_udp, model, self.backend.namespace)
            if deleted:
                CONNTRACK_DELETED.inc(deleted)
                daemon.log_fields(log, logging.INFO, "deleted stale UDP conntrack entries", count=deleted)

    def healthy(self) -> tuple[bool, str]:
        if not self.synced_once:
            return False, "not synced yet"
        if self.pending_since is not None and self.clock() - self.pending_since > STALE_AFTER:
            return False, f"a change has waited {self.clock() - self.pending_since:.0f}s to be programmed"
        return True, "ok"


class HealthCheckServers:
    """An HTTP server on each healthCheckNodePort of the Services with externalTrafficPolicy
    Local (kube-proxy's service health server): GET / answers 200 with
    {"service": {"namespace", "name"}, "localEndpoints": N} when this node has N > 0 ready
    endpoints for it, else 503. Ports open and close as Services change."""

    def __init__(self, addresses: tuple[str, ...] = (), proxy_healthy=lambda: (True, "ok")):
        self.addresses = addresses or ("0.0.0.0",)
        self.proxy_healthy = proxy_healthy
        self.checks: dict[int, HealthCheck] = {}
        self.sites: dict[int, list] = {}
        self.runner = None

    async def update(self, checks: dict[int, HealthCheck]) -> None:
        from aiohttp import web
        self.checks = checks  # answers change at once; only new or gone ports open or close
        if self.runner is None:
            app = web.Application()
            app.router.add_get("/", self._answer)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
        for number in [n for n in self.sites if n not in checks]:
            for site in self.sites.pop(number):
                await site.stop()
            daemon.log_fields(log, logging.INFO, "health check port closed", port=number)
        for number, check in checks.items():
            if number not in self.sites:
                await self._open(number, check)

    async def _open(self, number: int, check: HealthCheck) -> None:
        from aiohttp import web
        sites = []
        try:
            for address in self.addresses:
                site = web.TCPSite(self.runner, address, number, reuse_address=True)
                await site.start()
                sites.append(site)
        except OSError as err:  # e.g. the port is taken: report, try again at the next sync
            for site in sites:
                await site.stop()
            daemon.log_fields(log, logging.WARNING, "cannot open health check port", port=number,
                              service=f"{check.namespace}/{check.name}", error=str(err))
            return
        self.sites[number] = sites
        daemon.log_fields(log, logging.INFO, "health check port open", port=number,
                          service=f"{check.namespace}/{check.name}")

    async def _answer(self, request):
        from aiohttp import web
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        check = self.checks.get(sockname[1]) if sockname else None
        if check is None:
            return web.Response(status=404, text="no Service here\n")
        status, body, headers = health_answer(check, self.proxy_healthy()[0])
        return web.Response(status=status, text=body, content_type="application/json", headers=headers)

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner, self.sites = None, {}


def health_answer(check: HealthCheck, proxy_healthy: bool) -> tuple[int, str, dict]:
    """(status, JSON body, headers) for a health check, as kube-proxy answers it."""
    body = {"service": {"namespace": check.namespace, "name": check.name},
            "localEndpoints": check.local_endpoints, "serviceProxyHealthy": proxy_healthy}
    status = 200 if check.local_endpoints > 0 and proxy_healthy else 503
    headers = {"X-Load-Balancing-Endpoint-Weight": str(check.local_endpoints)}
    return status, json.dumps(body) + "\n", headers


def run_daemon(args, node: NodeFacts) -> int:
    from netplane.client import Client, WatchView
    from netplane.proxy.apply import backend_for

    daemon.setup_logging("proxy")
    holder: dict[str, Proxier] = {}

    def healthy() -> tuple[bool, str]:
        proxier = holder.get("proxier")
        return proxier.healthy() if proxier else (False, "starting")

    async def main(stop: asyncio.Event) -> None:
        client = Client(args.server)
        view = WatchView(client, ["Service", "EndpointSlice"])
        health_servers = HealthCheckServers(node.node_ips, healthy)
        proxier = holder["proxier"] = Proxier(view, node, backend_for(args.backend),
                                              clean_conntrack=args.conntrack_cleanup == "on",
                                              health_servers=health_servers)
        try:
            await follow(view, proxier, stop, min_interval=args.min_sync_interval)
        finally:
            await health_servers.close()
            await view.stop()
            await client.close()

    return daemon.run(main, component="proxy", health_listen=args.health_listen, healthy=healthy)


async def follow(view, proxier: Proxier, stop: asyncio.Event, min_interval: float = 0.1,
                 retry_interval: float = 1.0) -> None:
    """Start the view, wait until every kind has synced, then keep the rules in sync with it
    (coalesced; a failed sync retried after retry_interval) until `stop` is set."""
    from netplane.client import CoalescingRunner
    runner = CoalescingRunner(proxier.sync, min_interval=min_interval, retry_interval=retry_interval)

    def changed() -> None:
        proxier.on_change()
        runner.request()

    view.add_listener(changed)
    await view.start()
    if await _wait_synced(view, stop):
        daemon.log_fields(log, logging.INFO, "caches synced; programming", node=proxier.node.name,
                          backend=getattr(proxier.backend, "command", None) or proxier.backend.name)
        if getattr(proxier.backend, "library", True) is None:
            daemon.log_fields(log, logging.WARNING, "libnftables.so.1 not found: partial syncs run `nft -f` "
                              "(about 20 ms slower each)")
        runner.request()
        await runner.run(stop)


async def _wait_synced(view, stop: asyncio.Event) -> bool:
    """Wait for the watch caches (never program from partial state); False if stopped first."""
    synced = asyncio.ensure_future(view.wait_synced())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([synced, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (synced, stopped):
            task.cancel()
    return not stop.is_set()
