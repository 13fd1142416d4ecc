"""SQLite maintenance: compaction keeps the file near its live size, batches, retention, no lock errors."""
from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from netplane import store as store_mod
from netplane.store import Gone, Retention, RevisionClock, SQLiteStore, maintain_forever


def run(coro):
    return asyncio.run(coro)


def value_of(serial: int) -> bytes:
    return b'{"spec":{"data":"' + b"x" * 250 + b'"},"serial":' + str(serial).encode() + b"}"


def test_100000_writes_then_a_compaction_leave_the_file_close_to_its_live_size(tmp_path):
    keys = [f"/registry/core/configmaps/default/cm-{i:04d}" for i in range(1000)]

    async def churn() -> tuple[int, int, int]:
        store = SQLiteStore(str(tmp_path / "churned.db"))
        revisions: dict[str, int] = {}
        for serial in range(100_000):
            key = keys[serial % len(keys)]
            if key in revisions:
                revisions[key] = await store.update(key, value_of(serial), revisions[key])
            else:
                revisions[key] = await store.create(key, value_of(serial))
        before = store.file_size()
        removed = await store.compact(await store.current_revision())
        after = store.file_size()
        items, _ = await store.list("/registry/")
        assert [kv.value for kv in items] == [value_of(99_000 + i) for i in range(1000)]
        store.close()
        return before, removed, after

    async def live_only() -> int:
        """The same live objects, each written once into a new file: the size to compare with."""
        store = SQLiteStore(str(tmp_path / "fresh.db"))
        for i, key in enumerate(keys):
            await store.create(key, value_of(99_000 + i))
        store.reclaim_space()
        size = store.file_size()
        store.close()
        return size

    before, removed, after = run(churn())
    live = run(live_only())
    assert removed == 99_000
    assert before > 40 * live  # the history really was there
    assert after < 2 * live, f"{after} bytes after compaction for {live} bytes of live data"


def test_compaction_in_small_batches_removes_the_same_rows_and_old_watchers_get_gone(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "COMPACT_BATCH", 3)

    async def scenario():
        store = SQLiteStore(str(tmp_path / "s.db"), poll_interval=0.05)
        revision = await store.create("/b/a", b"0")
        for i in range(1, 20):
            revision = await store.update("/b/a", str(i).encode(), revision)
        await store.create("/b/gone", b"x")
        await store.delete("/b/gone")
        keep = await store.create("/b/kept", b"k")
        watcher = store.watch("/b/", 1)  # positioned before the compaction point
        removed = await store.compact(keep - 1)
        assert removed == 19 + 2  # every superseded version of a, and both rows of gone
        with pytest.raises(Gone):
            await anext(watcher)
        assert [(kv.key, kv.value) for kv in (await store.list("/b/"))[0]] == [("/b/a", b"19"), ("/b/kept", b"k")]
        remaining = store._db.execute("SELECT id, prev_value FROM log ORDER BY id").fetchall()
        assert remaining == [(keep - 3, None), (keep, None)]  # survivors below the point lost prev_value
        store.close()
    run(scenario())


def test_an_old_file_without_incremental_vacuum_is_converted_by_a_big_compaction(tmp_path):
    path = str(tmp_path / "old.db")
    legacy = sqlite3.connect(path)
    legacy.execute("PRAGMA auto_vacuum = NONE")
    legacy.executescript(store_mod._SCHEMA)
    legacy.close()

    async def scenario():
        store = SQLiteStore(path)
        assert store._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
        revision = await store.create("/k", b"0")
        for i in range(2000):
            revision = await store.update("/k", value_of(i), revision)
        await store.compact(revision)
        assert store._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL from now on
        assert store._db.execute("PRAGMA freelist_count").fetchone()[0] == 0
        store.close()
    run(scenario())


def test_writers_on_separate_connections_and_a_compactor_never_see_database_is_locked(tmp_path):
    path = str(tmp_path / "busy.db")
    SQLiteStore(path).close()
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        async def write():
            store = SQLiteStore(path)
            try:
                revision = await store.create(f"/busy/{index}", b"0")
                for i in range(300):
                    revision = await store.update(f"/busy/{index}", value_of(i), revision)
            finally:
                store.close()
        try:
            run(write())
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def compactor(stop: threading.Event) -> None:
        async def compact():
            store = SQLiteStore(path)
            try:
                while not stop.is_set():
                    await store.compact(await store.current_revision())
            finally:
                store.close()
        try:
            run(compact())
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    stop = threading.Event()
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    background = threading.Thread(target=compactor, args=(stop,))
    background.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    stop.set()
    background.join(60)
    assert not errors, errors

    async def check():
        store = SQLiteStore(path)
        items, _ = await store.list("/busy/")
        store.close()
        return {kv.key: kv.value for kv in items}
    assert run(check()) == {f"/busy/{i}": value_of(299) for i in range(4)}


# --- retention (pure) ----------------------------------------------------------------------------

def test_retention_keeps_the_last_n_revisions_and_the_last_t_seconds():
    clock = RevisionClock()
    policy = Retention(keep_revisions=100, keep_seconds=60)
    clock.record(0, 1000)
    assert clock.compaction_target(0, 1000, policy) == 0  # nothing is a minute old yet
    clock.record(30, 1500)
    clock.record(61, 1600)
    assert clock.compaction_target(61, 1600, policy) == 1000  # what was current a minute ago
    clock.record(95, 1650)
    assert clock.compaction_target(95, 1650, policy) == 1500
    # a quiet store: the age rule would allow everything, the count rule keeps 100 revisions
    clock.record(500, 1650)
    assert clock.compaction_target(500, 1650, policy) == 1550


class Stop(Exception):
    pass


def test_maintain_forever_compacts_what_the_retention_allows(tmp_path):
    """Ticks every 10 s (fake clock), 50 writes between ticks, keep 15 s and 20 revisions: at the
    fourth tick (t=30, revision 150) the newest revision at least 15 s old is 50 (t=10)."""
    async def scenario():
        store = SQLiteStore(str(tmp_path / "m.db"))
        now = [0.0]

        async def sleep(seconds):
            if now[0] == 30:
                raise Stop
            now[0] += seconds
            for i in range(50):
                await store.create(f"/m/{now[0]}-{i}", b"v")

        with pytest.raises(Stop):
            await maintain_forever(store, 10, Retention(keep_revisions=20, keep_seconds=15),
                                   clock=lambda: now[0], sleep=sleep)
        assert await store.current_revision() == 150
        assert await store.compacted_revision() == 50
        store.close()
    run(scenario())
