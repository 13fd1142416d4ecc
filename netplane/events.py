"""Events: what happened to an object, as `kubectl get events` and `kubectl describe` show them.

Each component that acts on objects (the scheduler, the controllers, the node agent) records what it
did and what went wrong through one EventRecorder: a core/v1 Event per (object, type, reason,
message), its `count` and `lastTimestamp` bumped when the same thing happens again, as client-go's
recorder does. Recording is best effort and never holds up the work it describes: it runs in the
background and a failure is only logged. The API server forgets events an hour after they were
last seen (kube-apiserver's --event-ttl default).
"""
from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta, timezone

from netplane.daemon import log_fields

log = logging.getLogger("events")

NORMAL, WARNING = "Normal", "Warning"
TTL = timedelta(hours=1)


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def involved(obj: dict) -> dict:
    """The involvedObject reference of an event about `obj`."""
    meta = obj.get("metadata") or {}
    ref = {"kind": obj.get("kind", ""), "name": meta.get("name", ""), "apiVersion": obj.get("apiVersion", "")}
    for key in ("namespace", "uid", "resourceVersion"):
        if meta.get(key):
            ref[key] = meta[key]
    return ref


def new_event(obj: dict, type_: str, reason: str, message: str, component: str, host: str, at: str) -> dict:
    """The Event object (pure). Events about cluster-wide objects (a Node) live in `default`."""
    ref = involved(obj)
    return {"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{ref['name']}.{time.time_ns():x}", "namespace": ref.get("namespace") or "default"},
            "involvedObject": ref, "type": type_, "reason": reason, "message": message,
            "source": {"component": component, **({"host": host} if host else {})},
            "reportingComponent": component, "reportingInstance": host or component,
            "firstTimestamp": at, "lastTimestamp": at, "count": 1}


def expired(event: dict, now: datetime) -> bool:
    """Last seen more than TTL ago (an event without timestamps counts from its creation)."""
    stamp = event.get("lastTimestamp") or (event.get("metadata") or {}).get("creationTimestamp")
    try:
        last = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        return False
    return now - last > TTL


class EventRecorder:
    def __init__(self, client, component: str, host: str = ""):
        self.client = client
        self.component = component
        self.host = host
        self._seen: dict[tuple, tuple[str, str, int]] = {}   # what happened -> (namespace, event name, count)
        self._pending: set[asyncio.Task] = set()

    def emit(self, obj: dict, type_: str, reason: str, message: str) -> None:
        """Record in the background (the caller goes on at once)."""
        task = asyncio.ensure_future(self.record(obj, type_, reason, message))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def record(self, obj: dict, type_: str, reason: str, message: str) -> None:
        """Create the Event, or count one more of the same; never raises."""
        from netplane.client import APIError
        ref = involved(obj)
        key = (ref.get("namespace"), ref["kind"], ref["name"], ref.get("uid"), type_, reason, message)
        at = now_rfc3339()
        try:
            if key in self._seen:
                namespace, name, count = self._seen[key]
                try:
                    await self.client.patch("Event", name, {"count": count + 1, "lastTimestamp": at}, namespace)
                    self._seen[key] = (namespace, name, count + 1)
                    return
                except APIError as err:
                    if err.status != 404:   # gone (expired): record it anew
                        raise
            event = await self.client.create(new_event(obj, type_, reason, message, self.component, self.host, at))
            self._seen[key] = (event["metadata"]["namespace"], event["metadata"]["name"], 1)
            if len(self._seen) > 4096:   # a long-running component: forget the oldest
                self._seen.pop(next(iter(self._seen)))
        except Exception as err:   # an event is best effort: the work it describes goes on
            log_fields(log, logging.WARNING, "event not recorded", reason=reason, object=ref["name"], error=str(err))

    async def flush(self) -> None:
        """Wait for events under way (a component stopping, or a test)."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
