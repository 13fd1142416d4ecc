"""The revisioned key-value store under the API server: an append-only log on embedded SQLite.

Kine style: one table whose row id is the revision. Every create, update and delete appends a
row (a delete appends a tombstone carrying the last value), so the log IS the watch history:
a watch from revision N replays the rows after N and then follows new ones. Compare-and-swap
is a check of the key's latest row inside one write transaction, backed by a unique index on
(key, prev_revision) so two writers can never both extend the same version of a key.
compact(R) drops history at or below R that no current value needs; a watch from below the
compacted revision is Gone (the API server's 410 Expired).

The interface (the Store protocol) is narrow and async so the etcd v3 backend (store_etcd.py)
stands beside this one; SQLite calls run inline because they take microseconds.

Maintenance is built in rather than left for later (kine's wart): compact() removes history in
short transactions, then checkpoints the WAL and gives the freed pages back to the file system
(incremental vacuum, or a full VACUUM after a compaction that removed most of the table), so a
long-lived store stays close to the size of its live data. maintain_forever() compacts
periodically under a Retention (keep the last N revisions and the last T seconds).
"""
from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Protocol

log = logging.getLogger("store")


class StoreError(Exception):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class NotFound(StoreError):
    def __init__(self, key: str):
        super().__init__(key, f"{key} not found")


class AlreadyExists(StoreError):
    def __init__(self, key: str):
        super().__init__(key, f"{key} already exists")


class Conflict(StoreError):
    """The key's revision is not the expected one (someone else wrote it first)."""

    def __init__(self, key: str, expected: int, actual: int):
        super().__init__(key, f"{key}: expected revision {expected}, found {actual}")
        self.expected = expected
        self.actual = actual


class Gone(StoreError):
    """The requested revision has been compacted away."""

    def __init__(self, revision: int, compacted: int):
        super().__init__("", f"revision {revision} is older than the compacted revision {compacted}")
        self.revision = revision
        self.compacted = compacted


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int      # the revision that wrote this value
    create_revision: int


@dataclass(frozen=True)
class Event:
    type: str               # "ADDED" | "MODIFIED" | "DELETED" | "PROGRESS" (nothing newer up to revision)
    key: str
    value: bytes            # for DELETED: the last value the key had
    revision: int           # the revision of this change
    prev_value: bytes | None  # the value before this change (None for ADDED)


class Store(Protocol):
    async def current_revision(self) -> int: ...
    async def get(self, key: str) -> KeyValue | None: ...
    async def list(self, prefix: str) -> tuple[list[KeyValue], int]: ...
    async def create(self, key: str, value: bytes) -> int: ...
    async def update(self, key: str, value: bytes, expected_revision: int | None) -> int: ...
    async def delete(self, key: str, expected_revision: int | None = None) -> KeyValue: ...
    def watch(self, prefix: str, after_revision: int,
              progress_interval: float | None = None) -> AsyncIterator[Event]: ...
    async def compacted_revision(self) -> int: ...
    async def compact(self, revision: int) -> int: ...
    def close(self) -> None: ...
    async def aclose(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- the revision
    key TEXT NOT NULL,
    created INTEGER NOT NULL,               -- 1: this row created the key
    deleted INTEGER NOT NULL,               -- 1: a tombstone; value is the last value
    create_revision INTEGER NOT NULL,
    prev_revision INTEGER NOT NULL,         -- the row this one supersedes (0: none)
    value BLOB NOT NULL,
    prev_value BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS log_key_prev ON log (key, prev_revision);
CREATE INDEX IF NOT EXISTS log_key_id ON log (key, id);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

_COLUMNS = "id, key, created, deleted, create_revision, prev_revision, value, prev_value"

COMPACT_BATCH = 20_000          # revisions examined per compaction transaction
VACUUM_MIN_ROWS = 1_000         # a compaction removing fewer rows never triggers a full VACUUM
VACUUM_MAX_ROWS = 200_000       # nor one leaving more (a VACUUM that long would stall requests)
WAL_SIZE_LIMIT = 16 * 1024 * 1024
MMAP_SIZE = 256 * 1024 * 1024


def prefix_end(prefix: str) -> str:
    """The smallest string greater than every string starting with `prefix` (for range scans)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else "\U0010ffff"


class SQLiteStore:
    """The Store on one SQLite file (WAL mode). Use one instance per process."""

    def __init__(self, path: str, poll_interval: float = 1.0):
        self.path = path
        # Writes made by another process are only seen by polling; our own wake watchers at once.
        self.poll_interval = poll_interval
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout = 5000")
        self._db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect on a new file
        self._db.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode: a commit survives a crash of this process (kill -9), though not
        # a power cut; FULL would fsync every write for that.
        self._db.execute("PRAGMA synchronous = NORMAL")
        # After a checkpoint, cut the -wal file back to this size instead of keeping its peak.
        self._db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        # Reads through a memory map: a large log's index lookups stay fast (about 3x at 100 MB).
        self._db.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")
        self._db.executescript(_SCHEMA)
        self._changed = asyncio.Event()

    # --- reads -----------------------------------------------------------------------------

    async def current_revision(self) -> int:
        return self._current_revision()

    def _current_revision(self) -> int:
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'log'").fetchone()
        return row[0] if row else 0

    async def compacted_revision(self) -> int:
        return self._compacted_revision()

    def _compacted_revision(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'compacted'").fetchone()
        return row[0] if row else 0

    def _latest(self, key: str) -> tuple | None:
        return self._db.execute(
            f"SELECT {_COLUMNS} FROM log WHERE key = ? ORDER BY id DESC LIMIT 1", (key,)).fetchone()

    async def get(self, key: str) -> KeyValue | None:
        row = self._latest(key)
        if row is None or row[3]:
            return None
        return KeyValue(row[1], row[6], row[0], row[4])

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every live key under `prefix`, in key order, and the revision the listing is at."""
        return _list_live(self._db, prefix)

    # --- writes ----------------------------------------------------------------------------

    def _append(self, key: str, *, created: bool, deleted: bool, create_revision: int,
                prev_revision: int, value: bytes, prev_value: bytes | None) -> int:
        cur = self._db.execute(
            "INSERT INTO log (key, created, deleted, create_revision, prev_revision, value, prev_value)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, int(created), int(deleted), create_revision, prev_revision, value, prev_value))
        revision = cur.lastrowid
        if created:  # a create row's create_revision is its own id
            self._db.execute("UPDATE log SET create_revision = id WHERE id = ?", (revision,))
        return revision

    def _write(self, fn):
        """Run fn() in one IMMEDIATE transaction (the CAS window), then wake the watchers."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = fn()
            self._db.execute("COMMIT")
        except BaseException as err:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if isinstance(err, sqlite3.IntegrityError):  # (key, prev_revision) taken: lost a race
                raise Conflict("", 0, 0) from None
            raise
        self._wake()
        return result

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def create(self, key: str, value: bytes) -> int:
        def do() -> int:
            latest = self._latest(key)
            if latest is not None and not latest[3]:
                raise AlreadyExists(key)
            return self._append(key, created=True, deleted=False, create_revision=0,
                                prev_revision=latest[0] if latest else 0, value=value, prev_value=None)
        return self._write(do)

    async def update(self, key: str, value: bytes, expected_revision: int | None) -> int:
        """Replace the value if the key's revision is `expected_revision` (None: any revision)."""
        def do() -> int:
            latest = self._latest(key)
            if latest is None or latest[3]:
                raise NotFound(key)
            if expected_revision is not None and latest[0] != expected_revision:
                raise Conflict(key, expected_revision, latest[0])
            return self._append(key, created=False, deleted=False, create_revision=latest[4],
                                prev_revision=latest[0], value=value, prev_value=latest[6])
        return self._write(do)

    async def delete(self, key: str, expected_revision: int | None = None) -> KeyValue:
        """Delete the key; returns its last value with the revision of the deletion."""
        def do() -> KeyValue:
            latest = self._latest(key)
            if latest is None or latest[3]:
                raise NotFound(key)
            if expected_revision is not None and latest[0] != expected_revision:
                raise Conflict(key, expected_revision, latest[0])
            revision = self._append(key, created=False, deleted=True, create_revision=latest[4],
                                    prev_revision=latest[0], value=latest[6], prev_value=latest[6])
            return KeyValue(key, latest[6], revision, latest[4])
        return self._write(do)

    async def compact(self, revision: int) -> int:
        """Forget history at or below `revision`: superseded rows and tombstones. Returns rows removed.

        The compacted revision is recorded first, so a watcher behind it gets Gone instead of
        silently missing the rows removed next. Rows go in batches of short transactions (other
        writers, even in other processes, wait milliseconds, never seconds); then the space is
        given back to the file system.
        """
        def mark() -> tuple[int, int] | None:
            target = min(revision, self._current_revision())
            if target <= self._compacted_revision():
                return None
            self._db.execute("INSERT INTO meta (name, value) VALUES ('compacted', ?)"
                             " ON CONFLICT (name) DO UPDATE SET value = excluded.value", (target,))
            oldest = self._db.execute("SELECT min(id) FROM log").fetchone()[0] or 1
            return target, oldest
        marked = self._write(mark)
        if marked is None:
            return 0
        target, oldest = marked
        removed = 0
        for low in range(oldest - 1, target, COMPACT_BATCH):
            high = min(low + COMPACT_BATCH, target)
            removed += self._write(lambda: self._remove_superseded(low, high, target))
            await asyncio.sleep(0)  # let requests in between batches
        self.reclaim_space(removed)
        return removed

    def _remove_superseded(self, low: int, high: int, target: int) -> int:
        """Delete the rows low < id <= high that no revision after `target` needs, and drop the
        previous values the survivors carry: only a replay of their own change would show them."""
        removed = self._db.execute(
            "DELETE FROM log WHERE id > ?1 AND id <= ?2 AND (deleted = 1 OR EXISTS ("
            "  SELECT 1 FROM log AS newer WHERE newer.key = log.key"
            "  AND newer.id > log.id AND newer.id <= ?3))", (low, high, target)).rowcount
        self._db.execute("UPDATE log SET prev_value = NULL WHERE id > ? AND id <= ? AND prev_value IS NOT NULL",
                         (low, high))
        return removed

    def reclaim_space(self, removed: int = 0) -> None:
        """Give freed pages back to the file system and shrink the WAL.

        After a compaction that removed more rows than remain, a full VACUUM: it rewrites the
        (now small) table densely, where the incremental vacuum only returns whole free pages
        and leaves the half-empty ones a scattered deletion makes.
        """
        remaining = self._db.execute("SELECT count(*) FROM log").fetchone()[0]
        if removed >= VACUUM_MIN_ROWS and removed > remaining and remaining <= VACUUM_MAX_ROWS:
            self._db.execute("VACUUM")  # also switches an old file to auto_vacuum = INCREMENTAL
        else:
            self._db.execute("PRAGMA incremental_vacuum")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # --- backup and size -------------------------------------------------------------------

    def backup(self, path: str) -> None:
        """A consistent copy of the whole store (history included) at `path`, taken online."""
        sqlite_backup(self._db, path)

    def file_size(self) -> int:
        """Bytes on disk: the database file and its WAL."""
        return sqlite_file_size(self.path)

    # --- watch -----------------------------------------------------------------------------

    def _rows_between(self, prefix: str, after: int, upto: int, limit: int = 500) -> list[tuple]:
        return self._db.execute(
            f"SELECT {_COLUMNS} FROM log WHERE id > ? AND id <= ? AND key >= ? AND key < ?"
            " ORDER BY id LIMIT ?", (after, upto, prefix, prefix_end(prefix), limit)).fetchall()

    async def watch(self, prefix: str, after_revision: int,
                    progress_interval: float | None = None) -> AsyncIterator[Event]:
        """Events for keys under `prefix` with revision > after_revision, replayed then live.

        Raises Gone if after_revision (or, later, the watcher's position) falls below the
        compacted revision. With progress_interval, a quiet watch yields a PROGRESS event (its
        revision: everything up to it has been delivered) at most that often, like etcd's
        progress notify. Nothing is registered anywhere, so an abandoned watch leaks nothing.
        """
        position = after_revision
        loop = asyncio.get_running_loop()
        last_progress = loop.time()
        while True:
            changed = self._changed  # taken before the query, so no write slips between
            compacted = self._compacted_revision()
            if position < compacted:
                raise Gone(position, compacted)
            # Rows up to a revision read first: every row at or below it is committed, so
            # moving `position` to it never skips a row another process is still writing.
            upto = self._current_revision()
            rows = self._rows_between(prefix, position, upto)
            for row in rows:
                yield _event(row)
                position = row[0]
            if rows:
                last_progress = loop.time()
                continue
            position = max(position, upto)  # nothing under our prefix up to `upto`
            if progress_interval is not None and loop.time() - last_progress >= progress_interval:
                last_progress = loop.time()
                yield Event("PROGRESS", "", b"", position, None)
            try:
                await asyncio.wait_for(changed.wait(), self.poll_interval)
            except asyncio.TimeoutError:
                pass

    def close(self) -> None:
        self._db.close()

    async def aclose(self) -> None:
        self.close()


def _event(row: tuple) -> Event:
    revision, key, created, deleted, _, _, value, prev_value = row
    kind = "DELETED" if deleted else "ADDED" if created else "MODIFIED"
    return Event(kind, key, value, revision, prev_value)


def _list_live(db: sqlite3.Connection, prefix: str) -> tuple[list[KeyValue], int]:
    """Every live key under `prefix`, in key order, and the revision, read in one snapshot."""
    db.execute("BEGIN")
    try:
        rows = db.execute(
            f"SELECT {_COLUMNS} FROM log WHERE id IN ("
            "  SELECT max(id) FROM log WHERE key >= ? AND key < ? GROUP BY key"
            ") AND deleted = 0 ORDER BY key", (prefix, prefix_end(prefix))).fetchall()
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'log'").fetchone()
    finally:
        db.execute("COMMIT")
    return [KeyValue(r[1], r[6], r[0], r[4]) for r in rows], row[0] if row else 0


# --- snapshots and file size (SQLite's online backup API) -------------------------------------

SQLITE_MAGIC = b"SQLite format 3\x00"


def is_sqlite_file(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC


def sqlite_backup(source: sqlite3.Connection, path: str) -> None:
    """Copy `source` page by page into a new file at `path`, one consistent point in time while
    readers and writers carry on. Written aside and renamed, so a failed backup never leaves a
    half file under the final name."""
    partial = f"{path}.partial"
    for leftover in (partial, f"{partial}-wal", f"{partial}-shm", f"{partial}-journal"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    target = sqlite3.connect(partial)
    try:
        source.backup(target)
        target.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, no -wal beside it
    finally:
        target.close()
    os.replace(partial, path)


def open_sqlite_readonly(path: str) -> sqlite3.Connection:
    """A read-only connection to a store file (or a snapshot of one), checked to be ours."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no SQLite store at {path}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as err:
        db.close()
        raise ValueError(f"{path} is not a netplane store: {err}") from None
    if not {"log", "meta"} <= tables:
        db.close()
        raise ValueError(f"{path} is not a netplane store (no log and meta tables)")
    return db


def read_sqlite_store(path: str, prefix: str = "") -> tuple[list[KeyValue], int]:
    """The live keys under `prefix` of a store file or snapshot, without changing the file."""
    db = open_sqlite_readonly(path)
    try:
        return _list_live(db, prefix)
    finally:
        db.close()


def sqlite_file_size(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, f"{path}-wal") if os.path.exists(p))


# --- periodic compaction -------------------------------------------------------------------------

@dataclass(frozen=True)
class Retention:
    """How much watch history to keep: compaction never touches the newest `keep_revisions`
    revisions, nor a revision written in the last `keep_seconds` (whichever keeps more)."""
    keep_revisions: int = 1000
    keep_seconds: float = 300.0


class RevisionClock:
    """When each revision was current, from samples, so "older than T seconds" becomes a
    revision. Pure: the caller passes the time."""

    def __init__(self):
        self._samples: deque[tuple[float, int]] = deque()

    def record(self, now: float, revision: int) -> None:
        self._samples.append((now, revision))

    def compaction_target(self, now: float, current: int, retention: Retention) -> int:
        """The newest revision that may be compacted now (0: nothing yet)."""
        old_enough = 0
        # The newest sample at least keep_seconds old bounds the age rule; older ones are spent.
        while self._samples and now - self._samples[0][0] >= retention.keep_seconds:
            sample = self._samples.popleft()
            old_enough = sample[1]
            if not self._samples or now - self._samples[0][0] < retention.keep_seconds:
                self._samples.appendleft(sample)
                break
        return max(0, min(current - retention.keep_revisions, old_enough))


async def maintain_forever(store: Store, interval: float, retention: Retention = Retention(),
                           clock: Callable[[], float] = time.monotonic,
                           sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
    """Every `interval` seconds, compact what `retention` allows (SQLite then reclaims space)."""
    revisions = RevisionClock()
    while True:
        try:
            current = await store.current_revision()
            now = clock()
            revisions.record(now, current)
            target = revisions.compaction_target(now, current, retention)
            if target:
                removed = await store.compact(target)
                if removed:
                    log.info("compacted up to revision %d: %d removed", target, removed)
        except Exception:  # keep serving; the next tick tries again
            log.exception("store maintenance failed")
        await sleep(interval)


# --- choosing a backend --------------------------------------------------------------------------

def is_etcd_location(location: str) -> bool:
    return location.startswith(("http://", "https://", "etcd://"))


def open_store(location: str, backend: str | None = None) -> Store:
    """The store at `location`: backend "etcd" (endpoints "http://127.0.0.1:2379[,...]") or
    "sqlite" (a file path); None guesses from the location (a URL means etcd)."""
    if backend is None:
        backend = "etcd" if is_etcd_location(location) else "sqlite"
    if backend == "etcd":
        from netplane.store_etcd import EtcdStore  # imported here: SQLite users need no HTTP client
        return EtcdStore(location)
    if backend == "sqlite":
        return SQLiteStore(location)
    raise ValueError(f"store backend {backend!r}: expected sqlite or etcd")
