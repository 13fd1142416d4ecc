"""The Store on etcd v3, for when users outgrow one machine; spoken through etcd's JSON gateway.

etcd serves its gRPC API as JSON too (POST /v3/kv/range, /v3/kv/txn, /v3/watch ...; keys and
values base64), so plain aiohttp is the whole client. The mapping onto the Store contract:

- a revision is etcd's revision; an object's resourceVersion is its key's mod_revision;
- create / update / delete are transactions comparing the key's create_revision (exists or
  not) or mod_revision (compare-and-swap), so of two racing writers exactly one wins;
- a list is a range read pinned to one revision, page by page;
- a watch is one streamed POST /v3/watch from after_revision + 1 with prev_kv; a watch etcd
  cancels as compacted raises Gone, like SQLite's;
- compact(R) compacts etcd at R + 1: etcd keeps the changes AT its compaction revision, while our
  contract says a watch from R itself still works and one from below R is Gone. When R is the
  newest revision, a write to COMPACTION_MARKER (outside /registry/) makes R + 1 exist first.

LocalEtcd runs an etcd of our own on loopback (tests, bench, a one-machine lab).
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from typing import AsyncIterator, Sequence

import aiohttp

from netplane.store import AlreadyExists, Conflict, Event, Gone, KeyValue, NotFound, StoreError

COMPACTED = 11        # gRPC OutOfRange: "mvcc: required revision has been compacted"
PAGE_SIZE = 1000      # keys per range request when listing
REQUEST_TIMEOUT = 10.0
COMPACTION_MARKER = "/.netplane/compacted"  # bumped when compacting at the newest revision


class EtcdError(StoreError):
    """etcd answered with an error or could not be reached."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__("", message)
        self.code = code


def parse_endpoints(location: str | Sequence[str]) -> list[str]:
    """Base URLs from "http://a:2379,http://b:2379" or a list ("etcd://h:p" and "h:p" mean http)."""
    parts = location.split(",") if isinstance(location, str) else list(location)
    endpoints = []
    for part in (p.strip().rstrip("/") for p in parts):
        if not part:
            continue
        if part.startswith("etcd://"):
            part = "http://" + part[len("etcd://"):]
        if "://" not in part:
            part = "http://" + part
        if not part.startswith(("http://", "https://")):
            raise ValueError(f"etcd endpoint {part!r}: expected http://HOST:PORT")
        endpoints.append(part)
    if not endpoints:
        raise ValueError("no etcd endpoint given")
    return endpoints


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def key_range(prefix: str) -> dict:
    """The etcd range (key, range_end) of every key starting with `prefix` ("": all keys)."""
    raw = prefix.encode()
    if not raw:
        return {"key": _b64(b"\0"), "range_end": _b64(b"\0")}
    end = bytearray(raw)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:  # all 0xff: no upper bound
        return {"key": _b64(raw), "range_end": _b64(b"\0")}
    end[-1] += 1
    return {"key": _b64(raw), "range_end": _b64(bytes(end))}


def _kv(item: dict) -> KeyValue:
    return KeyValue(_unb64(item["key"]).decode(), _unb64(item.get("value")),
                    int(item.get("mod_revision", 0)), int(item.get("create_revision", 0)))


def _event(item: dict) -> Event:
    """A watch event as ours: a PUT of version 1 created the key."""
    kv, prev = item["kv"], item.get("prev_kv")
    key = _unb64(kv["key"]).decode()
    revision = int(kv["mod_revision"])
    prev_value = _unb64(prev.get("value")) if prev else None
    if item.get("type") == "DELETE":
        # Without prev_kv (its revision compacted meanwhile) the last value is unknown.
        return Event("DELETED", key, prev_value or b"", revision, prev_value)
    kind = "ADDED" if kv.get("version") == "1" else "MODIFIED"
    return Event(kind, key, _unb64(kv.get("value")), revision, None if kind == "ADDED" else prev_value)


async def _json_body(resp: aiohttp.ClientResponse) -> dict:
    raw = await resp.read()
    try:
        return json.loads(raw)
    except ValueError:
        return {"message": f"HTTP {resp.status}: {raw[:200].decode(errors='replace')}"}


def _error(status: int, body: dict | None) -> EtcdError:
    body = body or {}
    return EtcdError(f"etcd: {body.get('message') or body.get('error') or f'HTTP {status}'}", body.get("code"))


def _watch_step(message: dict, position: int) -> tuple[list[Event], int]:
    """One streamed watch message -> (our events, the revision delivered up to). Pure."""
    if "error" in message:
        raise _error(200, message["error"])
    result = message.get("result") or {}
    if result.get("canceled"):
        compacted = int(result.get("compact_revision", 0))
        if compacted:
            raise Gone(position, compacted - 1)
        raise EtcdError(f"etcd cancelled the watch: {result.get('cancel_reason') or 'no reason given'}")
    events = [_event(item) for item in result.get("events") or []]
    if events:
        return [e for e in events if e.key != COMPACTION_MARKER], events[-1].revision
    if not result.get("created"):  # a progress notification: everything up to it was sent
        position = max(position, int(result.get("header", {}).get("revision", 0)))
    return [], position


class _MessageReader:
    """The JSON messages of a streamed gateway response, one per line; a message may be large."""

    def __init__(self, stream: aiohttp.StreamReader):
        self._stream = stream
        self._buffer = b""

    async def next(self) -> dict:
        while b"\n" not in self._buffer:
            chunk = await self._stream.readany()
            if not chunk:
                raise EtcdError("etcd closed the watch stream")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line) if line.strip() else await self.next()


class EtcdStore:
    """The Store on an etcd v3 cluster (3.4+). Use it from one event loop at a time."""

    def __init__(self, endpoints: str | Sequence[str], request_timeout: float = REQUEST_TIMEOUT,
                 page_size: int = PAGE_SIZE):
        self.endpoints = parse_endpoints(endpoints)
        self.request_timeout = request_timeout
        self.page_size = page_size
        self._preferred = 0  # the endpoint that answered last
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    # --- transport -------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        """The HTTP session of the running loop (a new one if the loop changed, as in tests)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            self.close()
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.request_timeout),
                connector=aiohttp.TCPConnector(limit=0))  # each open watch holds a connection
            self._session_loop = loop
        return self._session

    def _endpoint_order(self) -> list[str]:
        return self.endpoints[self._preferred:] + self.endpoints[:self._preferred]

    async def _call(self, path: str, body: dict) -> dict:
        """POST one request. A refused connection moves on to the next endpoint; a connection
        dropped mid-request is retried only for reads, so a write is never applied twice."""
        failures = []
        for endpoint in self._endpoint_order():
            for attempt in ("first", "again"):
                try:
                    async with self._client().post(endpoint + path, json=body) as resp:
                        data = await _json_body(resp)
                        if resp.status != 200:
                            raise _error(resp.status, data)
                        self._preferred = self.endpoints.index(endpoint)
                        return data
                except aiohttp.ClientConnectorError as err:
                    failures.append(f"{endpoint}: {err}")
                    break
                except aiohttp.ServerDisconnectedError:  # e.g. a pooled connection etcd closed
                    if path != "/v3/kv/range" or attempt == "again":
                        raise EtcdError(f"etcd at {endpoint} closed the connection during {path}") from None
                except aiohttp.ClientError as err:
                    raise EtcdError(f"etcd at {endpoint}: {path}: {err}") from None
                except asyncio.TimeoutError:
                    raise EtcdError(f"etcd at {endpoint} did not answer {path} "
                                    f"within {self.request_timeout:g} s") from None
        raise EtcdError("no etcd endpoint answers: " + "; ".join(failures))

    async def _txn(self, compare: list[dict], success: list[dict], failure: list[dict]) -> dict:
        return await self._call("/v3/kv/txn", {"compare": compare, "success": success, "failure": failure})

    # --- reads -----------------------------------------------------------------------------

    async def current_revision(self) -> int:
        result = await self._call("/v3/kv/range", {"key": _b64(b"\0"), "count_only": True})
        return int(result["header"]["revision"])

    async def get(self, key: str) -> KeyValue | None:
        result = await self._call("/v3/kv/range", {"key": _b64(key)})
        kvs = result.get("kvs")
        return _kv(kvs[0]) if kvs else None

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under `prefix`, in key order, all pages read at the first page's revision."""
        span = key_range(prefix)
        items: list[KeyValue] = []
        revision = 0
        while True:
            request = {**span, "limit": str(self.page_size)}
            if revision:
                request["revision"] = str(revision)
            result = await self._call("/v3/kv/range", request)
            revision = revision or int(result["header"]["revision"])
            page = [_kv(item) for item in result.get("kvs", [])]
            items.extend(kv for kv in page if kv.key != COMPACTION_MARKER)
            if not result.get("more") or not page:
                return items, revision
            span = {**span, "key": _b64(page[-1].key.encode() + b"\0")}

    async def compacted_revision(self) -> int:
        """Ours is etcd's compaction revision - 1 (see the module notes). etcd does not say it,
        but a read at a compacted revision fails: found by bisection (about 20 reads)."""
        low, high = 1, await self.current_revision()  # the lowest readable revision is in [low, high]
        while low < high:
            middle = (low + high) // 2
            try:
                await self._call("/v3/kv/range", {"key": _b64(b"\0"), "count_only": True,
                                                  "revision": str(middle)})
                high = middle
            except EtcdError as err:
                if err.code != COMPACTED:
                    raise
                low = middle + 1
        return max(0, low - 1)

    # --- writes ----------------------------------------------------------------------------

    @staticmethod
    def _exists(key: str) -> dict:
        return {"target": "CREATE", "key": _b64(key), "result": "GREATER", "create_revision": "0"}

    @staticmethod
    def _at_revision(key: str, revision: int) -> dict:
        return {"target": "MOD", "key": _b64(key), "result": "EQUAL", "mod_revision": str(revision)}

    def _lost(self, key: str, expected: int | None, result: dict) -> StoreError:
        """Why a compare failed, from the failure branch's read of the key."""
        kvs = result["responses"][0]["response_range"].get("kvs")
        if not kvs:
            return NotFound(key)
        return Conflict(key, expected or 0, int(kvs[0]["mod_revision"]))

    async def create(self, key: str, value: bytes) -> int:
        result = await self._txn(
            [{"target": "CREATE", "key": _b64(key), "result": "EQUAL", "create_revision": "0"}],
            [{"request_put": {"key": _b64(key), "value": _b64(value)}}], [])
        if not result.get("succeeded"):
            raise AlreadyExists(key)
        return int(result["header"]["revision"])

    async def update(self, key: str, value: bytes, expected_revision: int | None) -> int:
        """Replace the value if the key's revision is `expected_revision` (None: any revision)."""
        compare = self._exists(key) if expected_revision is None else self._at_revision(key, expected_revision)
        result = await self._txn([compare], [{"request_put": {"key": _b64(key), "value": _b64(value)}}],
                                 [{"request_range": {"key": _b64(key)}}])
        if not result.get("succeeded"):
            raise self._lost(key, expected_revision, result)
        return int(result["header"]["revision"])

    async def delete(self, key: str, expected_revision: int | None = None) -> KeyValue:
        """Delete the key; returns its last value with the revision of the deletion."""
        compare = self._exists(key) if expected_revision is None else self._at_revision(key, expected_revision)
        result = await self._txn([compare], [{"request_delete_range": {"key": _b64(key), "prev_kv": True}}],
                                 [{"request_range": {"key": _b64(key)}}])
        if not result.get("succeeded"):
            raise self._lost(key, expected_revision, result)
        previous = _kv(result["responses"][0]["response_delete_range"]["prev_kvs"][0])
        return KeyValue(key, previous.value, int(result["header"]["revision"]), previous.create_revision)

    async def compact(self, revision: int) -> int:
        """Forget history at or below `revision`; returns how many revisions were newly forgotten
        (etcd does not count rows). The bolt file keeps its size until a defragment."""
        before = await self.compacted_revision()
        current = await self.current_revision()
        revision = min(revision, current)
        if revision <= before:
            return 0
        if revision == current:  # etcd needs revision + 1 to exist: one write outside any prefix we serve
            await self._call("/v3/kv/put", {"key": _b64(COMPACTION_MARKER), "value": _b64(str(revision))})
        target = revision + 1
        try:
            await self._call("/v3/kv/compaction", {"revision": str(target), "physical": True})
        except EtcdError as err:
            if err.code == COMPACTED:  # someone compacted further meanwhile
                return 0
            raise
        return target - 1 - before

    async def db_size(self) -> int:
        """Bytes of etcd's backend file (of the member that answers)."""
        return int((await self._call("/v3/maintenance/status", {})).get("dbSize", 0))

    async def defragment(self) -> None:
        """Give the space compaction freed back to the file system (blocks this member briefly)."""
        await self._call("/v3/maintenance/defragment", {})

    # --- watch -----------------------------------------------------------------------------

    async def watch(self, prefix: str, after_revision: int,
                    progress_interval: float | None = None) -> AsyncIterator[Event]:
        """Events under `prefix` with revision > after_revision, replayed then live; Gone when
        etcd has compacted past them. Once the watch is established, a quiet watch yields
        PROGRESS at most every progress_interval, at the newest revision known delivered
        (etcd's progress notifications move it on; without them it stays at the last event)."""
        request = {"create_request": {**key_range(prefix), "start_revision": str(after_revision + 1),
                                      "prev_kv": True, "progress_notify": True}}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.request_timeout)
        endpoint = self._endpoint_order()[0]
        loop = asyncio.get_running_loop()
        async with self._client().post(endpoint + "/v3/watch", json=request, timeout=timeout) as resp:
            if resp.status != 200:
                raise _error(resp.status, await _json_body(resp))
            reader = _MessageReader(resp.content)
            position = after_revision
            established = False
            quiet_since = loop.time()
            # One read always pending; waiting on it with a timeout (not wait_for) never loses data.
            pending = asyncio.ensure_future(reader.next())
            try:
                while True:
                    wait = None
                    if progress_interval is not None and established:
                        wait = max(0.0, quiet_since + progress_interval - loop.time())
                    done, _ = await asyncio.wait({pending}, timeout=wait)
                    if not done:
                        quiet_since = loop.time()
                        yield Event("PROGRESS", "", b"", position, None)
                        continue
                    message = pending.result()
                    pending = asyncio.ensure_future(reader.next())
                    established = True
                    events, position = _watch_step(message, position)
                    for event in events:
                        yield event
                    if events:
                        quiet_since = loop.time()
            finally:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)

    # --- lifecycle -------------------------------------------------------------------------

    async def aclose(self) -> None:
        session, self._session = self._session, None
        self._session_loop = None
        if session is not None and not session.closed:
            await session.close()

    def close(self) -> None:
        """Synchronous close for callers outside a loop; inside one, prefer `await aclose()`."""
        session, self._session = self._session, None
        loop, self._session_loop = self._session_loop, None
        if session is None or session.closed:
            return
        if loop.is_closed():
            session.detach()  # its sockets died with the loop
        elif loop.is_running():
            loop.create_task(session.close())
        else:
            loop.run_until_complete(session.close())


# =============================================================================================
# An etcd of our own on loopback
# =============================================================================================

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class LocalEtcd:
    """One etcd member serving on `host` with its data in `data_dir`; `with LocalEtcd(dir) as url:`.

    Ports 0 pick free ones. Fast election settings suit one member on one machine. Stops (and,
    if need be, kills) the process on exit, also when the body fails.
    """

    def __init__(self, data_dir: str, host: str = "127.0.0.1", client_port: int = 0, peer_port: int = 0,
                 progress_interval: str = "5s", command_prefix: Sequence[str] = ()):
        self.data_dir = data_dir
        self.host = host
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        self.progress_interval = progress_interval
        self.command_prefix = list(command_prefix)  # e.g. netns.enter(ns, []) for a node namespace
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(os.path.dirname(os.path.abspath(data_dir)),
                                     os.path.basename(data_dir) + ".log")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    def argv(self) -> list[str]:
        binary = shutil.which("etcd")
        if binary is None:
            raise FileNotFoundError("etcd not found (Debian: apt-get install etcd-server)")
        peer = f"http://{self.host}:{self.peer_port}"
        return self.command_prefix + [
            binary, "--name", "netplane", "--data-dir", self.data_dir,
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"netplane={peer}",
            "--heartbeat-interval", "10", "--election-timeout", "100",
            "--experimental-watch-progress-notify-interval", self.progress_interval,
            "--logger", "zap", "--log-level", "warn"]

    def start(self, timeout: float = 20.0) -> str:
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        os.chmod(self.data_dir, 0o700)  # etcd insists
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(self.argv(), stdout=log_file, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"etcd did not become healthy at {self.url}: {self._log_tail()}")
            time.sleep(0.02)
        return self.url

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as resp:
                return json.load(resp).get("health") == "true"
        except (OSError, ValueError):
            return False

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
