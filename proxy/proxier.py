"""Lab mode: follow Services and EndpointSlices on the API server and keep the rules in sync.

Level-triggered and coalesced: a watch event only marks the state dirty; the runner renders the
whole model from the watch cache at most every min-sync-interval and applies it (a full table
on the first sync and after any failure, only what changed otherwise). Nothing is programmed
until both kinds have synced (never from partial state). A failed apply leaves the old rules in
the kernel and is retried. Bad objects are reported once each, never crash the daemon.
"""
from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import Counter, Gauge, Histogram

from netplane import daemon
from netplane.proxy import conntrack
from netplane.proxy.model import Model, NodeFacts, build_model

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
                 clock=time.monotonic):
        self.view = view
        self.node = node
        self.backend = backend
        self.clean_conntrack = clean_conntrack
        self.clock = clock
        self.pending_since: float | None = None  # oldest change not yet programmed
        self.synced_once = False
        self.reported_errors: set[str] = set()

    def on_change(self) -> None:
        if self.pending_since is None:
            self.pending_since = self.clock()

    def model(self) -> Model:
        return build_model(self.view.list("Service"), self.view.list("EndpointSlice"), self.node)

    def _report(self, model: Model) -> None:
        errors = set(model.errors)
        for error in sorted(errors - self.reported_errors):
            daemon.log_fields(log, logging.WARNING, "skipping bad object", error=error)
        self.reported_errors = errors
        BAD_OBJECTS.set(len(errors))

    async def sync(self) -> None:
        claimed, self.pending_since = self.pending_since, None
        started = time.monotonic()
        model = self.model()
        self._report(model)
        try:
            result = await asyncio.to_thread(self.backend.sync, model)
        except Exception:
            SYNC_FAILURES.inc()
            if claimed is not None:
                self.pending_since = claimed if self.pending_since is None else min(claimed, self.pending_since)
            elif self.pending_since is None:
                self.pending_since = self.clock()
            raise  # the runner logs it and retries; the backend forces a full sync next time
        elapsed = time.monotonic() - started
        SYNC_SECONDS.labels("full" if result.full else "partial").observe(elapsed)
        LAST_SYNC.set(time.time())
        SERVICES.set(result.services)
        RULES.set(result.rules)
        CHAINS.set(result.chains)
        self.synced_once = True
        daemon.log_fields(log, logging.INFO, "synced", full=result.full, services=result.services,
                          rules=result.rules, bytes=result.bytes, seconds=round(elapsed, 4))
        if self.clean_conntrack:
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


def run_daemon(args, node: NodeFacts) -> int:
    from netplane.client import Client, CoalescingRunner, WatchView
    from netplane.proxy.apply import backend_for

    daemon.setup_logging("proxy")
    holder: dict[str, Proxier] = {}

    def healthy() -> tuple[bool, str]:
        proxier = holder.get("proxier")
        return proxier.healthy() if proxier else (False, "starting")

    async def main(stop: asyncio.Event) -> None:
        client = Client(args.server)
        view = WatchView(client, ["Service", "EndpointSlice"])
        proxier = holder["proxier"] = Proxier(view, node, backend_for(args.backend),
                                              clean_conntrack=args.conntrack_cleanup == "on")
        runner = CoalescingRunner(proxier.sync, min_interval=args.min_sync_interval, retry_interval=1.0)

        def changed() -> None:
            proxier.on_change()
            runner.request()

        view.add_listener(changed)
        try:
            await view.start()
            if await _wait_synced(view, stop):
                daemon.log_fields(log, logging.INFO, "caches synced; programming", node=node.name,
                                  backend=args.backend)
                runner.request()
                await runner.run(stop)
        finally:
            await view.stop()
            await client.close()

    return daemon.run(main, component="proxy", health_listen=args.health_listen, healthy=healthy)


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
