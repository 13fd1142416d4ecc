"""One contract for every store backend: the same tests on embedded SQLite and on a real etcd.

etcd cases start their own etcd on loopback (free ports, a temporary data dir) and stop it even
when the test fails; they are skipped, with the reason, when the etcd binary is not installed.
Revisions are compared relatively: etcd's first write is revision 2, SQLite's is 1.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import threading
from dataclasses import dataclass
from typing import Callable

import aiohttp
import pytest

from netplane.apiserver import APIServer
from netplane.store import AlreadyExists, Conflict, Gone, NotFound, SQLiteStore, Store
from netplane.store_etcd import EtcdStore, LocalEtcd
from tests.unit.test_apiserver import RunningAPIServer

NO_ETCD = shutil.which("etcd") is None
SKIP_ETCD = pytest.mark.skipif(NO_ETCD, reason="etcd binary not found (Debian: apt-get install etcd-server)")


@dataclass
class Backend:
    """A running backing store and how to open a client of it (each open = a separate writer)."""
    name: str
    location: str  # the SQLite file or the etcd URL

    def open(self) -> Store:
        if self.name == "sqlite":
            return SQLiteStore(self.location, poll_interval=0.05)
        return EtcdStore(self.location)


@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=SKIP_ETCD)])
def backend(request, tmp_path):
    if request.param == "sqlite":
        yield Backend("sqlite", str(tmp_path / "store.db"))
        return
    with LocalEtcd(str(tmp_path / "etcd"), progress_interval="100ms") as url:
        yield Backend("etcd", url)


def with_store(backend: Backend, scenario: Callable) -> None:
    """asyncio.run(scenario(store)) with a fresh client, closed afterwards."""
    async def main():
        store = backend.open()
        try:
            return await scenario(store)
        finally:
            await store.aclose()
    return asyncio.run(main())


async def take(events, count: int, timeout: float = 5.0) -> list:
    async def collect():
        return [await anext(events) for _ in range(count)]
    return await asyncio.wait_for(collect(), timeout)


# --- basic semantics ---------------------------------------------------------------------------

def test_create_update_delete_and_their_errors(backend):
    async def scenario(store: Store):
        start = await store.current_revision()
        r1 = await store.create("/c/a", b"v1")
        assert r1 == start + 1
        with pytest.raises(AlreadyExists):
            await store.create("/c/a", b"again")
        r2 = await store.update("/c/a", b"v2", r1)
        got = await store.get("/c/a")
        assert (got.value, got.mod_revision, got.create_revision) == (b"v2", r2, r1)
        with pytest.raises(Conflict) as err:
            await store.update("/c/a", b"stale", r1)
        assert (err.value.expected, err.value.actual) == (r1, r2)
        with pytest.raises(Conflict):
            await store.delete("/c/a", expected_revision=r1)
        with pytest.raises(NotFound):
            await store.update("/c/missing", b"x", None)
        with pytest.raises(NotFound):
            await store.delete("/c/missing")
        deleted = await store.delete("/c/a", expected_revision=r2)
        assert (deleted.value, deleted.mod_revision) == (b"v2", r2 + 1)
        assert await store.get("/c/a") is None
        recreated = await store.create("/c/a", b"v3")
        assert (await store.get("/c/a")).create_revision == recreated
        assert await store.current_revision() == recreated
    with_store(backend, scenario)


def test_list_is_by_prefix_in_key_order_at_one_revision(backend):
    async def scenario(store: Store):
        for key in ("/l/pods/default/b", "/l/pods/default/a", "/l/pods/default2/c", "/l/pods/kube/x"):
            await store.create(key, key.encode())
        await store.delete("/l/pods/kube/x")
        items, revision = await store.list("/l/pods/default/")
        assert [(kv.key, kv.value) for kv in items] == [("/l/pods/default/a", b"/l/pods/default/a"),
                                                        ("/l/pods/default/b", b"/l/pods/default/b")]
        assert revision == await store.current_revision()
        assert len((await store.list("/l/pods/"))[0]) == 3
        assert (await store.list("/nothing/"))[0] == []
    with_store(backend, scenario)


# --- racing writers ------------------------------------------------------------------------------

def race(backend: Backend, writers: int, rounds: int, attempt) -> list[list[str]]:
    """`writers` threads, each with its own client and event loop, all calling attempt(store,
    round) at the same moment, `rounds` times; returns each round's outcomes."""
    start, read, done = (threading.Barrier(writers, timeout=30) for _ in range(3))
    outcomes = [[None] * writers for _ in range(rounds)]
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        async def loop(store: Store):
            for round_ in range(rounds):
                start.wait()
                prepared = await attempt.prepare(store, round_)
                read.wait()  # everyone has read the same state; now all write at once
                try:
                    outcomes[round_][index] = await attempt.write(store, round_, prepared)
                finally:
                    done.wait()
        try:
            with_store(backend, loop)
        except BaseException as err:  # noqa: BLE001 - reported by the test thread
            errors.append(err)
            for barrier in (start, read, done):
                barrier.abort()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return outcomes


class UpdateAtRevision:
    """Everyone reads the object's revision, then writes with it as the expected revision."""

    async def prepare(self, store, round_):
        return (await store.get("/race/obj")).mod_revision

    async def write(self, store, round_, revision):
        try:
            await store.update("/race/obj", f"round {round_}".encode(), revision)
            return "won"
        except Conflict:
            return "conflict"


class CreateSameKey:
    async def prepare(self, store, round_):
        return None

    async def write(self, store, round_, _):
        try:
            await store.create(f"/race/new-{round_}", b"x")
            return "won"
        except AlreadyExists:
            return "exists"


def test_writers_racing_on_one_object_exactly_one_wins_the_others_conflict(backend):
    with_store(backend, lambda store: store.create("/race/obj", b"initial"))
    outcomes = race(backend, writers=4, rounds=25, attempt=UpdateAtRevision())
    for round_ in outcomes:
        assert sorted(round_) == ["conflict", "conflict", "conflict", "won"], round_

    async def check(store):
        kv = await store.get("/race/obj")
        assert kv.value == b"round 24"
        assert kv.mod_revision == kv.create_revision + 25  # exactly one write per round landed
    with_store(backend, check)


def test_writers_racing_to_create_one_key_exactly_one_succeeds(backend):
    outcomes = race(backend, writers=4, rounds=10, attempt=CreateSameKey())
    for round_ in outcomes:
        assert sorted(round_) == ["exists", "exists", "exists", "won"], round_


# --- watch -------------------------------------------------------------------------------------

def test_watch_from_an_old_revision_replays_every_change_in_order_then_goes_live(backend):
    async def scenario(store: Store):
        before = await store.current_revision()
        expected = []  # (type, key, value, prev_value) of every change under /w/
        revisions = {}
        for i in range(30):
            key = f"/w/k{i % 7}"
            current = await store.get(key)
            if current is None:
                revisions[key] = await store.create(key, f"{i}".encode())
                expected.append(("ADDED", key, f"{i}".encode(), None))
            elif i % 5 == 0:
                await store.delete(key)
                expected.append(("DELETED", key, current.value, current.value))
            else:
                await store.update(key, f"{i}".encode(), current.mod_revision)
                expected.append(("MODIFIED", key, f"{i}".encode(), current.value))
            await store.create(f"/other/{i}", b"not under the prefix")
        events = store.watch("/w/", before)
        replayed = await take(events, len(expected))
        assert [(e.type, e.key, e.value, e.prev_value) for e in replayed] == expected
        assert [e.revision for e in replayed] == sorted({e.revision for e in replayed})
        live_revision = await store.create("/w/live", b"now")
        (live,) = await take(events, 1)
        assert (live.type, live.key, live.revision) == ("ADDED", "/w/live", live_revision)
        await events.aclose()
    with_store(backend, scenario)


def test_a_watch_sees_writes_made_through_another_client(backend):
    async def scenario(store: Store):
        other = backend.open()
        try:
            events = store.watch("/x/", await store.current_revision())
            first = asyncio.ensure_future(anext(events))
            await asyncio.sleep(0.05)
            revision = await other.create("/x/a", b"from elsewhere")
            event = await asyncio.wait_for(first, 5)
            assert (event.type, event.value, event.revision) == ("ADDED", b"from elsewhere", revision)
            await events.aclose()
        finally:
            await other.aclose()
    with_store(backend, scenario)


def test_a_quiet_watch_reports_progress(backend):
    async def scenario(store: Store):
        await store.create("/p/a", b"1")
        events = store.watch("/p/", await store.current_revision() - 1, progress_interval=0.2)
        added, progress = await take(events, 2)
        assert added.type == "ADDED"
        assert progress.type == "PROGRESS" and progress.revision >= added.revision
        await events.aclose()
    with_store(backend, scenario)


def test_after_compaction_an_old_watch_is_gone_and_current_values_survive(backend):
    async def scenario(store: Store):
        first = await store.create("/g/a", b"1")
        second = await store.update("/g/a", b"2", first)
        await store.create("/g/gone", b"x")
        tombstone = (await store.delete("/g/gone")).mod_revision
        await store.create("/g/after", b"y")  # history beyond the compaction point
        await store.compact(tombstone)
        assert await store.compacted_revision() == tombstone
        with pytest.raises(Gone):
            await take(store.watch("/g/", first), 1)
        with pytest.raises(Gone):
            await take(store.watch("/g/", tombstone - 1), 1)
        assert (await store.get("/g/a")).value == b"2"
        assert [kv.key for kv in (await store.list("/g/"))[0]] == ["/g/a", "/g/after"]
        events = store.watch("/g/", tombstone)  # from the compacted revision itself: still fine
        (after,) = await take(events, 1)
        assert (after.type, after.key) == ("ADDED", "/g/after")
        await store.update("/g/a", b"3", second)
        (event,) = await take(events, 1)
        assert (event.type, event.value, event.prev_value) == ("MODIFIED", b"3", b"2")
        await events.aclose()
        assert await store.compact(tombstone) == 0  # again: nothing more to forget
        await store.create("/g/gone", b"again")  # a key whose history was compacted comes back
    with_store(backend, scenario)


# --- through the API server ----------------------------------------------------------------------

class BackendAPIServer(RunningAPIServer):
    """The in-thread API server of test_apiserver.py, over any backend."""

    def __init__(self, backend: Backend):
        super().__init__("")
        self.backend = backend

    async def _start(self) -> int:
        self.store = self.backend.open()
        self.server = APIServer(self.store, "127.0.0.1", 6443)
        return await self.server.start("127.0.0.1:0")

    def __exit__(self, *exc) -> None:
        self.call(self.server.stop())
        self.call(self.store.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def config_map(name: str, data: dict) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default"},
            "data": data}


def test_the_api_server_answers_410_for_a_watch_from_a_compacted_revision(backend):
    async def scenario(url: str, api: BackendAPIServer):
        async with aiohttp.ClientSession() as http:
            path = url + "/api/v1/namespaces/default/configmaps"
            async with http.post(path, json=config_map("c", {"v": "1"})) as resp:
                assert resp.status == 201
                old = (await resp.json())["metadata"]["resourceVersion"]
            async with http.put(path + "/c", json=config_map("c", {"v": "2"})) as resp:
                assert resp.status == 200
                new = (await resp.json())["metadata"]["resourceVersion"]
            api.call(api.store.compact(int(new)))
            async with http.get(path, params={"watch": "true", "resourceVersion": old}) as resp:
                error = json.loads(await asyncio.wait_for(resp.content.readline(), 5))
            assert error["type"] == "ERROR"
            assert (error["object"]["code"], error["object"]["reason"]) == (410, "Expired")
            async with http.get(path, params={"watch": "true", "resourceVersion": new,
                                              "timeoutSeconds": "1"}) as resp:
                assert resp.status == 200
                assert b"ERROR" not in await resp.read()

    with BackendAPIServer(backend) as api:
        asyncio.run(scenario(api.url, api))
