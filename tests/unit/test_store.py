"""The revisioned store: CAS, listing, watch replay and live events, compaction -> Gone."""
from __future__ import annotations

import asyncio

import pytest

from netplane.store import AlreadyExists, Conflict, Gone, NotFound, SQLiteStore, prefix_end


@pytest.fixture
def db(tmp_path):
    store = SQLiteStore(str(tmp_path / "store.db"), poll_interval=0.05)
    yield store
    store.close()


def run(coro):
    return asyncio.run(coro)


async def take(events, count: int, timeout: float = 5.0) -> list:
    """The next `count` events of an async iterator (fails the test on timeout)."""
    async def collect():
        return [await anext(events) for _ in range(count)]
    return await asyncio.wait_for(collect(), timeout)


def test_create_get_update_delete_bump_the_revision(db):
    async def scenario():
        assert await db.current_revision() == 0
        r1 = await db.create("/registry/core/pods/default/a", b"v1")
        r2 = await db.update("/registry/core/pods/default/a", b"v2", r1)
        got = await db.get("/registry/core/pods/default/a")
        assert (got.value, got.mod_revision, got.create_revision) == (b"v2", r2, r1)
        deleted = await db.delete("/registry/core/pods/default/a")
        assert deleted.value == b"v2" and deleted.mod_revision == r2 + 1
        assert await db.get("/registry/core/pods/default/a") is None
        assert await db.current_revision() == 3
    run(scenario())


def test_create_twice_is_already_exists_but_create_after_delete_works(db):
    async def scenario():
        await db.create("/k", b"1")
        with pytest.raises(AlreadyExists):
            await db.create("/k", b"2")
        await db.delete("/k")
        revision = await db.create("/k", b"3")
        assert (await db.get("/k")).create_revision == revision
    run(scenario())


def test_update_with_a_stale_revision_is_a_conflict_and_changes_nothing(db):
    async def scenario():
        first = await db.create("/k", b"1")
        await db.update("/k", b"2", first)
        with pytest.raises(Conflict) as err:
            await db.update("/k", b"3", first)
        assert err.value.expected == first
        assert (await db.get("/k")).value == b"2"
        with pytest.raises(Conflict):
            await db.delete("/k", expected_revision=first)
        with pytest.raises(NotFound):
            await db.update("/missing", b"x", None)
    run(scenario())


def test_list_is_by_prefix_in_key_order_and_skips_deleted(db):
    async def scenario():
        for key in ("/r/pods/default/b", "/r/pods/default/a", "/r/pods/default2/c", "/r/pods/kube/x"):
            await db.create(key, key.encode())
        await db.delete("/r/pods/kube/x")
        items, revision = await db.list("/r/pods/default/")
        assert [kv.key for kv in items] == ["/r/pods/default/a", "/r/pods/default/b"]
        assert revision == await db.current_revision() == 5
        everything, _ = await db.list("/r/pods/")
        assert len(everything) == 3
    run(scenario())


def test_prefix_end_is_the_first_key_after_the_prefix():
    assert prefix_end("/a/") == "/a0"
    assert "/a/zzz" < prefix_end("/a/") and "/a0" >= prefix_end("/a/")


def test_watch_replays_from_an_old_revision_in_order_then_goes_live(db):
    async def scenario():
        start = await db.create("/r/a", b"a1")
        await db.update("/r/a", b"a2", start)
        await db.create("/other/z", b"not ours")
        await db.create("/r/b", b"b1")
        await db.delete("/r/a")
        events = db.watch("/r/", start)
        replayed = await take(events, 3)
        assert [(e.type, e.key, e.value) for e in replayed] == [
            ("MODIFIED", "/r/a", b"a2"), ("ADDED", "/r/b", b"b1"), ("DELETED", "/r/a", b"a2")]
        assert [e.revision for e in replayed] == sorted(e.revision for e in replayed)
        assert replayed[0].prev_value == b"a1"
        live_revision = await db.update("/r/b", b"b2", (await db.get("/r/b")).mod_revision)
        (live,) = await take(events, 1)
        assert (live.type, live.value, live.prev_value, live.revision) == ("MODIFIED", b"b2", b"b1", live_revision)
        await events.aclose()
    run(scenario())


def test_watch_from_a_compacted_revision_is_gone_but_current_values_survive(db):
    async def scenario():
        first = await db.create("/r/a", b"1")
        second = await db.update("/r/a", b"2", first)
        await db.create("/r/gone", b"x")
        tombstone = (await db.delete("/r/gone")).mod_revision
        removed = await db.compact(tombstone)
        assert removed == 3  # a's first version, and both rows of the deleted key
        assert await db.compacted_revision() == tombstone
        with pytest.raises(Gone):
            await take(db.watch("/r/", first), 1)
        assert (await db.get("/r/a")).value == b"2"
        items, _ = await db.list("/r/")
        assert [kv.key for kv in items] == ["/r/a"]
        # a watch from the compacted revision itself still sees everything after it
        events = db.watch("/r/", tombstone)
        await db.update("/r/a", b"3", second)
        (event,) = await take(events, 1)
        assert event.value == b"3"
        await events.aclose()
        # re-creating a key whose history was compacted away works
        await db.create("/r/gone", b"again")
    run(scenario())


def test_a_quiet_watch_reports_progress(db):
    async def scenario():
        await db.create("/r/a", b"1")
        await db.create("/s/x", b"1")
        events = db.watch("/r/", 0, progress_interval=0.0)
        added, progress = await take(events, 2)
        assert added.type == "ADDED"
        assert progress.type == "PROGRESS" and progress.revision == 2
        await events.aclose()
    run(scenario())


def test_data_survives_reopening_the_file(tmp_path):
    async def write():
        store = SQLiteStore(str(tmp_path / "s.db"))
        await store.create("/k", b"v")
        store.close()

    async def read():
        store = SQLiteStore(str(tmp_path / "s.db"))
        try:
            return (await store.get("/k")).value, await store.current_revision()
        finally:
            store.close()
    run(write())
    assert run(read()) == (b"v", 1)
