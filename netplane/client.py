"""The one API client and watch cache every component uses.

- Client: async REST calls on the Kubernetes paths (netplane.kinds builds them).
- Informer: list, then watch from the list's resourceVersion; reconnect on a broken stream; relist on
  410 Gone. Keeps a cache of current objects by (namespace, name).
- WatchView / FileView: what a component reads objects from, live from the API server or from a file
  (offline mode). Both answer list(kind) / get(kind, ns, name) and call listeners on change.
- ChangeTracker: the objects of one kind changed since a consumer last looked (kube-proxy's change
  trackers), so a sync after one change costs O(changed), not O(all objects).
- CoalescingRunner: events only mark work dirty; the runner calls the sync function at most once per
  interval, so a burst of changes costs one sync (level-triggered, as kube-proxy does).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterable

import aiohttp

from netplane import kinds
from netplane.kinds import Kind
from netplane.objects import changes_between, key_of

log = logging.getLogger("client")

DEFAULT_LAB_KUBECONFIG = "/var/lib/netplane/lab/kubeconfig"


class APIError(Exception):
    """A non-2xx answer from the API server, carrying its metav1.Status reason and message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def resolve_server(server: str | None = None, kubeconfig: str | None = None) -> str:
    """Where the API server is: --server, else --kubeconfig / $KUBECONFIG, else $NETPLANE_SERVER,
    else the lab's kubeconfig."""
    if server:
        return server.rstrip("/")
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if not path and os.environ.get("NETPLANE_SERVER"):
        return os.environ["NETPLANE_SERVER"].rstrip("/")
    path = path or DEFAULT_LAB_KUBECONFIG
    return server_from_kubeconfig(path)


def server_from_kubeconfig(path: str) -> str:
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise APIError(0, "NoServer", f"no API server given and cannot read kubeconfig {path}: "
                       f"{err.strerror} (is the lab up? `netplane lab up`)") from None
    contexts = {c["name"]: c["context"] for c in config.get("contexts") or []}
    clusters = {c["name"]: c["cluster"] for c in config.get("clusters") or []}
    context = contexts.get(config.get("current-context")) or next(iter(contexts.values()), {})
    cluster = clusters.get(context.get("cluster")) or next(iter(clusters.values()), {})
    if not cluster.get("server"):
        raise APIError(0, "NoServer", f"kubeconfig {path} names no cluster server")
    return cluster["server"].rstrip("/")


def _kind(kind: Kind | str) -> Kind:
    return kind if isinstance(kind, Kind) else kinds.by_kind(kind)


class Client:
    def __init__(self, server: str, timeout: float = 30.0):
        self.server = server.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_env(cls) -> "Client":
        return cls(resolve_server())

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def request(self, method: str, path: str, body: dict | None = None,
                      params: dict | None = None, content_type: str = "application/json") -> dict:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        async with self.session.request(method, self.server + path, data=data, params=params,
                                        headers=headers, timeout=self._timeout) as resp:
            text = await resp.text()
            payload = _json_or_none(text)
            if resp.status >= 300:
                raise _api_error(resp.status, payload, text)
            return payload if isinstance(payload, dict) else {}

    async def get(self, kind: Kind | str, name: str, namespace: str | None = None) -> dict:
        k = _kind(kind)
        return await self.request("GET", k.path(namespace or _default_ns(k), name))

    async def list(self, kind: Kind | str, namespace: str | None = None,
                   label_selector: str | None = None, field_selector: str | None = None) -> dict:
        k = _kind(kind)
        return await self.request("GET", k.path(namespace), params=_selectors(label_selector, field_selector))

    async def create(self, obj: dict) -> dict:
        k = kinds.of(obj)
        namespace = obj.get("metadata", {}).get("namespace") or _default_ns(k)
        return await self.request("POST", k.path(namespace), obj)

    async def update(self, obj: dict, subresource: str | None = None) -> dict:
        k = kinds.of(obj)
        meta = obj.get("metadata", {})
        path = k.path(meta.get("namespace") or _default_ns(k), meta["name"], subresource)
        return await self.request("PUT", path, obj)

    async def patch(self, kind: Kind | str, name: str, patch: dict, namespace: str | None = None,
                    subresource: str | None = None) -> dict:
        """A JSON merge patch (RFC 7386)."""
        k = _kind(kind)
        return await self.request("PATCH", k.path(namespace or _default_ns(k), name, subresource),
                                  patch, content_type="application/merge-patch+json")

    async def delete(self, kind: Kind | str, name: str, namespace: str | None = None) -> dict | None:
        """Delete; None when it was already gone."""
        k = _kind(kind)
        try:
            return await self.request("DELETE", k.path(namespace or _default_ns(k), name),
                                      {"propagationPolicy": "Background"})
        except APIError as err:
            if err.status == 404:
                return None
            raise

    async def bind(self, pod_name: str, namespace: str, node_name: str) -> dict:
        binding = {"apiVersion": "v1", "kind": "Binding",
                   "metadata": {"name": pod_name, "namespace": namespace},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": node_name}}
        path = kinds.by_kind("Pod").path(namespace, pod_name, "binding")
        return await self.request("POST", path, binding)

    async def watch(self, kind: Kind | str, namespace: str | None = None,
                    resource_version: str | None = None, label_selector: str | None = None,
                    field_selector: str | None = None,
                    timeout_seconds: int | None = None) -> AsyncIterator[tuple[str, dict]]:
        """Yield (type, object) from one watch stream until it ends.

        An ERROR event carrying a Status raises APIError (410 Expired means: relist).
        """
        k = _kind(kind)
        params = _selectors(label_selector, field_selector)
        params["watch"] = "true"
        params["allowWatchBookmarks"] = "true"
        if resource_version:
            params["resourceVersion"] = resource_version
        if timeout_seconds:
            params["timeoutSeconds"] = str(timeout_seconds)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)
        async with self.session.get(self.server + k.path(namespace), params=params,
                                    timeout=timeout) as resp:
            if resp.status >= 300:
                text = await resp.text()
                raise _api_error(resp.status, _json_or_none(text), text)
            async for line in _lines(resp.content):
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise APIError(status.get("code", 500), status.get("reason", "Error"),
                                   status.get("message", "watch error"))
                yield event["type"], event["object"]


async def _lines(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    # readline() has a line-length limit; watch events can be larger, so split ourselves.
    buffer = b""
    async for chunk in stream.iter_any():
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


def _default_ns(k: Kind) -> str | None:
    return "default" if k.namespaced else None


def _selectors(label_selector: str | None, field_selector: str | None) -> dict:
    params = {}
    if label_selector:
        params["labelSelector"] = label_selector
    if field_selector:
        params["fieldSelector"] = field_selector
    return params


def _json_or_none(text: str):
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _api_error(status: int, payload, text: str) -> APIError:
    if isinstance(payload, dict) and payload.get("kind") == "Status":
        return APIError(status, payload.get("reason", ""), payload.get("message", text))
    return APIError(status, "", text.strip()[:500])


# ---------------------------------------------------------------------------------------------
# Watch cache

Listener = Callable[[], None]
Changes = dict[tuple[str, str], "dict | None"]  # (namespace, name) -> the object now, None if deleted


class ChangeTracker:
    """What changed in one kind since the last take(), for one consumer; the first take() has
    every object there is. An informer records into it as events arrive."""

    def __init__(self, current: dict[tuple[str, str], dict]):
        self._changed: Changes = dict(current)

    def record(self, key: tuple[str, str], obj: dict | None) -> None:
        self._changed[key] = obj

    def take(self) -> Changes:
        changes, self._changed = self._changed, {}
        return changes


class ListingTracker:
    """A ChangeTracker for a view that can only list: compares each listing with the last one
    by identity (O(all objects), cheap; for files and tests)."""

    def __init__(self, view, kind: str):
        self._view, self._kind = view, kind
        self._seen: dict[tuple[str, str], dict] = {}

    def take(self) -> Changes:
        current = {key_of(o): o for o in self._view.list(self._kind)}
        changes, self._seen = changes_between(self._seen, current), current
        return changes


class UnseenWrites:
    """Values a controller has written that its watch view does not show yet, so that a pass on a
    stale view does not hand them out again: key -> value, each kept until the view shows the key
    with that value, no longer lists the key, or `ttl` seconds have passed."""

    def __init__(self, ttl: float = 15.0):
        self.ttl = ttl
        self._notes: dict = {}   # key -> (value, until)

    def note(self, key, value, now: float) -> None:
        self._notes[key] = (value, now + self.ttl)

    def forget(self, key) -> None:
        self._notes.pop(key, None)

    def unseen(self, shown: dict, now: float) -> dict:
        """{key: value} still unseen; `shown`: key -> the values the view has for it now."""
        for key, (value, until) in list(self._notes.items()):
            if key not in shown or value in shown[key] or now > until:
                del self._notes[key]
        return {key: value for key, (value, _) in self._notes.items()}


def tracker_for(view, kind: str):
    """The view's own change tracker for `kind`, or one that compares listings."""
    make = getattr(view, "tracker", None)
    return make(kind) if make is not None else ListingTracker(view, kind)


class Informer:
    """List then watch one kind; keep the current objects; tell listeners when anything changes."""

    def __init__(self, client: Client, kind: Kind | str, namespace: str | None = None,
                 field_selector: str | None = None, label_selector: str | None = None,
                 retry_delay: float = 1.0):
        self.client = client
        self.kind = _kind(kind)
        self.namespace = namespace
        self.field_selector = field_selector
        self.label_selector = label_selector
        self.retry_delay = retry_delay
        self.cache: dict[tuple[str, str], dict] = {}
        self.synced = asyncio.Event()
        self.resource_version = ""
        self._listeners: list[Listener] = []
        self._trackers: list[ChangeTracker] = []
        self._task: asyncio.Task | None = None

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def tracker(self) -> ChangeTracker:
        tracker = ChangeTracker(self.cache)
        self._trackers.append(tracker)
        return tracker

    def _record(self, key: tuple[str, str], obj: dict | None) -> None:
        for tracker in self._trackers:
            tracker.record(key, obj)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"informer-{self.kind.plural}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def _notify(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:  # a listener's bug must not stop the watch
                log.exception("listener failed")

    async def _relist(self) -> None:
        listing = await self.client.list(self.kind, self.namespace, self.label_selector, self.field_selector)
        fresh = {}
        for item in listing.get("items") or []:
            item.setdefault("kind", self.kind.kind)
            item.setdefault("apiVersion", self.kind.api_version)
            fresh[key_of(item)] = item
        for key in self.cache.keys() - fresh.keys():
            self._record(key, None)
        for key, item in fresh.items():
            self._record(key, item)
        self.cache = fresh
        self.resource_version = listing.get("metadata", {}).get("resourceVersion", "")
        self.synced.set()
        self._notify()

    def _apply(self, event_type: str, obj: dict) -> None:
        rv = obj.get("metadata", {}).get("resourceVersion")
        if rv:
            self.resource_version = rv
        if event_type == "BOOKMARK":
            return
        key = key_of(obj)
        if event_type == "DELETED":
            self.cache.pop(key, None)
            self._record(key, None)
        else:
            obj.setdefault("kind", self.kind.kind)
            obj.setdefault("apiVersion", self.kind.api_version)
            self.cache[key] = obj
            self._record(key, obj)
        self._notify()

    async def _run(self) -> None:
        need_list = True
        while True:
            try:
                if need_list:
                    await self._relist()
                    need_list = False
                async for event_type, obj in self.client.watch(
                        self.kind, self.namespace, self.resource_version,
                        self.label_selector, self.field_selector, timeout_seconds=300):
                    self._apply(event_type, obj)
                # The server closed the stream (timeout): resume from the last revision seen.
            except asyncio.CancelledError:
                raise
            except APIError as err:
                if err.status == 410:
                    log.info("watch of %s expired; relisting", self.kind.plural)
                else:
                    log.warning("watch of %s failed: %s", self.kind.plural, err)
                    await asyncio.sleep(self.retry_delay)
                need_list = True
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as err:
                log.warning("watch of %s broken (%s); retrying", self.kind.plural, err)
                await asyncio.sleep(self.retry_delay)


class View:
    """What components read objects from: list/get by kind, synced, listeners."""

    def list(self, kind: str) -> list[dict]:
        raise NotImplementedError

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        raise NotImplementedError

    def add_listener(self, listener: Listener) -> None:
        raise NotImplementedError

    def tracker(self, kind: str):
        """A change tracker for `kind` (see ChangeTracker)."""
        return ListingTracker(self, kind)

    async def start(self) -> None:
        pass

    async def wait_synced(self) -> None:
        pass

    def is_synced(self) -> bool:
        return True

    async def stop(self) -> None:
        pass


class FileView(View):
    """Offline mode: a fixed set of objects (e.g. from objects.load_file)."""

    def __init__(self, objects: Iterable[dict]):
        self._by_kind: dict[str, dict[tuple[str, str], dict]] = {}
        for obj in objects:
            self._by_kind.setdefault(obj.get("kind", ""), {})[key_of(obj)] = obj

    def list(self, kind: str) -> list[dict]:
        return list(self._by_kind.get(kind, {}).values())

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        return self._by_kind.get(kind, {}).get((namespace, name))

    def add_listener(self, listener: Listener) -> None:
        pass  # nothing ever changes


class WatchView(View):
    """Live objects from the API server: one Informer per kind."""

    def __init__(self, client: Client, kind_names: Iterable[str],
                 field_selectors: dict[str, str] | None = None,
                 label_selectors: dict[str, str] | None = None):
        field_selectors = field_selectors or {}
        label_selectors = label_selectors or {}
        self.client = client
        self.informers = {
            name: Informer(client, name, field_selector=field_selectors.get(name),
                           label_selector=label_selectors.get(name))
            for name in kind_names
        }

    def list(self, kind: str) -> list[dict]:
        return list(self.informers[kind].cache.values())

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        return self.informers[kind].cache.get((namespace, name))

    def add_listener(self, listener: Listener) -> None:
        for informer in self.informers.values():
            informer.add_listener(listener)

    def tracker(self, kind: str) -> ChangeTracker:
        return self.informers[kind].tracker()

    async def start(self) -> None:
        for informer in self.informers.values():
            informer.start()

    async def wait_synced(self) -> None:
        await asyncio.gather(*(i.synced.wait() for i in self.informers.values()))

    def is_synced(self) -> bool:
        return all(i.synced.is_set() for i in self.informers.values())

    async def stop(self) -> None:
        for informer in self.informers.values():
            await informer.stop()


class CoalescingRunner:
    """Run `sync()` after request(), at most once per `min_interval`; many requests, one run.

    A failed sync is logged and retried after `retry_interval`. `periodic` (seconds, optional)
    forces a resync even when nothing was requested.
    """

    def __init__(self, sync: Callable[[], Awaitable[None]], min_interval: float = 0.1,
                 retry_interval: float = 1.0, periodic: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.sync = sync
        self.min_interval = min_interval
        self.retry_interval = retry_interval
        self.periodic = periodic
        self.clock = clock
        self._dirty = asyncio.Event()
        self.last_run: float | None = None
        self.last_error: BaseException | None = None

    def request(self) -> None:
        self._dirty.set()

    async def _wait_for_work(self, stop: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(self._dirty.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, timeout=self.periodic, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._wait_for_work(stop)
            if stop.is_set():
                return
            if self.last_run is not None:
                delay = self.min_interval - (self.clock() - self.last_run)
                if delay > 0:
                    await asyncio.sleep(delay)
            self._dirty.clear()
            self.last_run = self.clock()
            try:
                await self.sync()
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as err:  # keep the daemon alive; retry later
                self.last_error = err
                log.exception("sync failed; retrying in %.1fs", self.retry_interval)
                await asyncio.sleep(self.retry_interval)
                self._dirty.set()


async def watch_and_sync(server: str, kind_names: Iterable[str], make_sync: Callable[[Client, View], Callable],
                         stop: asyncio.Event, min_interval: float = 0.1, periodic: float | None = None) -> None:
    """The usual reconcile daemon: watch `kind_names`, and after any change (coalesced) call the sync
    function that `make_sync(client, view)` returns, until `stop` is set."""
    client = Client(server)
    view = WatchView(client, kind_names)
    runner = CoalescingRunner(make_sync(client, view), min_interval=min_interval, periodic=periodic)
    view.add_listener(runner.request)
    await view.start()
    try:
        await runner.run(stop)
    finally:
        await view.stop()
        await client.close()
