"""The revisioned key-value store under the API server: an append-only log on embedded SQLite.

Kine style: one table whose row id is the revision. Every create, update and delete appends a
row (a delete appends a tombstone carrying the last value), so the log IS the watch history:
a watch from revision N replays the rows after N and then follows new ones. Compare-and-swap
is a check of the key's latest row inside one write transaction, backed by a unique index on
(key, prev_revision) so two writers can never both extend the same version of a key.
compact(R) drops history at or below R that no current value needs; a watch from below the
compacted revision is Gone (the API server's 410 Expired).

The interface (the Store protocol) is narrow and async so an etcd v3 backend can stand beside
this one; SQLite calls run inline because they take microseconds.
"""
from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from typing import AsyncIterator, Protocol


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
        self._db.execute("PRAGMA synchronous = NORMAL")
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
        self._db.execute("BEGIN")  # one snapshot for the rows and the revision
        try:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM log WHERE id IN ("
                "  SELECT max(id) FROM log WHERE key >= ? AND key < ? GROUP BY key"
                ") AND deleted = 0 ORDER BY key", (prefix, prefix_end(prefix))).fetchall()
            revision = self._current_revision()
        finally:
            self._db.execute("COMMIT")
        return [KeyValue(r[1], r[6], r[0], r[4]) for r in rows], revision

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
        """Forget history at or below `revision`: superseded rows and tombstones. Returns rows removed."""
        def do() -> int:
            revision_ = min(revision, self._current_revision())
            if revision_ <= self._compacted_revision():
                return 0
            removed = self._db.execute(
                "DELETE FROM log WHERE id <= ?1 AND (deleted = 1 OR EXISTS ("
                "  SELECT 1 FROM log AS newer WHERE newer.key = log.key"
                "  AND newer.id > log.id AND newer.id <= ?1))", (revision_,)).rowcount
            self._db.execute("INSERT INTO meta (name, value) VALUES ('compacted', ?)"
                             " ON CONFLICT (name) DO UPDATE SET value = excluded.value", (revision_,))
            return removed
        removed = self._write(do)
        self._db.execute("PRAGMA incremental_vacuum")
        return removed

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


def _event(row: tuple) -> Event:
    revision, key, created, deleted, _, _, value, prev_value = row
    kind = "DELETED" if deleted else "ADDED" if created else "MODIFIED"
    return Event(kind, key, value, revision, prev_value)


def open_store(location: str) -> Store:
    """The store named by `location`: a SQLite file path (an etcd URL is issue 7)."""
    if location.startswith(("http://", "https://", "etcd://")):
        raise NotImplementedError(f"etcd backend not available yet: {location}")
    return SQLiteStore(location)
