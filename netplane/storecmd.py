"""`netplane store ...`: back up, restore, inspect and compact the API server's store.

    netplane store snapshot FILE [--db DB | --etcd-endpoints URL] [--format auto|sqlite|jsonl]
    netplane store restore FILE [--db DB | --etcd-endpoints URL]
    netplane store status [--db DB | --etcd-endpoints URL]
    netplane store compact [--db DB | --etcd-endpoints URL] [--keep-revisions N] [--defragment]

Two snapshot formats:
- sqlite: SQLite's online backup of the whole file, history and revisions included (the
  default for a SQLite store); restoring it into SQLite gives back exactly that file.
- jsonl: portable JSON lines, the live keys under --prefix read at one revision (the default
  for etcd, and the way to move a cluster between backends): a header line, one line per key,
  and an end line with the count, so a truncated file is refused rather than half restored.
Restore reads and checks the whole snapshot before writing anything, writes only into an empty
store, and compares what it wrote with the snapshot afterwards. Restored by replay (jsonl, or
into etcd), objects get new revisions: clients relist, as after any restore.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Iterator

from netplane import store as store_mod
from netplane.store import KeyValue, StoreError

FORMAT_VERSION = 1
DEFAULT_PREFIX = "/registry/"  # the API server's keyspace


class SnapshotError(ValueError):
    pass


def default_db() -> str:
    """The lab's store, where `netplane lab up` keeps it."""
    return os.path.join(os.environ.get("NETPLANE_LAB_DIR", "/var/lib/netplane/lab"), "store.db")


# =============================================================================================
# The JSON-lines format (pure)
# =============================================================================================

def encode_snapshot(items: list[KeyValue], revision: int, source: str, prefix: str,
                    taken_at: str) -> Iterator[str]:
    """The lines of a snapshot (without newlines). Values that are UTF-8 (our JSON objects) stay
    readable; anything else is base64."""
    yield json.dumps({"netplaneSnapshot": FORMAT_VERSION, "source": source, "prefix": prefix,
                      "revision": revision, "count": len(items), "takenAt": taken_at})
    for kv in items:
        line = {"key": kv.key, "createRevision": kv.create_revision, "modRevision": kv.mod_revision}
        try:
            line["value"] = kv.value.decode()
        except UnicodeDecodeError:
            line["valueBase64"] = base64.b64encode(kv.value).decode()
        yield json.dumps(line, separators=(",", ":"))
    yield json.dumps({"end": True, "count": len(items)})


@dataclass(frozen=True)
class Snapshot:
    source: str
    prefix: str
    revision: int
    items: list[KeyValue]


def decode_snapshot(lines: Iterable[str]) -> Snapshot:
    """Parse and check a whole snapshot; errors name the line."""
    header = None
    items: list[KeyValue] = []
    seen: set[str] = set()
    ended = False
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        if ended:
            raise SnapshotError(f"line {number}: data after the end line")
        try:
            line = json.loads(text)
        except ValueError as err:
            raise SnapshotError(f"line {number}: not JSON ({err})") from None
        if not isinstance(line, dict):
            raise SnapshotError(f"line {number}: expected a JSON object")
        if header is None:
            if line.get("netplaneSnapshot") != FORMAT_VERSION:
                raise SnapshotError(f"line {number}: not a netplane snapshot (netplaneSnapshot: "
                                    f"{line.get('netplaneSnapshot')!r}, expected {FORMAT_VERSION})")
            header = line
        elif line.get("end"):
            if line.get("count") != len(items):
                raise SnapshotError(f"line {number}: end line counts {line.get('count')} keys, found {len(items)}")
            ended = True
        else:
            kv = _item(line, number)
            if kv.key in seen:
                raise SnapshotError(f"line {number}: key {kv.key} appears twice")
            seen.add(kv.key)
            items.append(kv)
    if header is None:
        raise SnapshotError("empty file: no snapshot header")
    if not ended:
        raise SnapshotError(f"no end line after {len(items)} keys: the snapshot is truncated")
    return Snapshot(str(header.get("source", "")), str(header.get("prefix", "")), int(header.get("revision", 0)),
                    items)


def _item(line: dict, number: int) -> KeyValue:
    key = line.get("key")
    if not isinstance(key, str) or not key:
        raise SnapshotError(f"line {number}: key: expected a non-empty string")
    if isinstance(line.get("value"), str):
        value = line["value"].encode()
    elif isinstance(line.get("valueBase64"), str):
        try:
            value = base64.b64decode(line["valueBase64"], validate=True)
        except ValueError:
            raise SnapshotError(f"line {number}: valueBase64: not base64") from None
    else:
        raise SnapshotError(f"line {number}: {key}: no value or valueBase64")
    return KeyValue(key, value, int(line.get("modRevision", 0)), int(line.get("createRevision", 0)))


# =============================================================================================
# Shell: snapshot and restore against a real store
# =============================================================================================

@dataclass(frozen=True)
class Target:
    """Which store a command works on."""
    backend: str   # "sqlite" | "etcd"
    location: str  # file path or endpoints

    def describe(self) -> str:
        return f"etcd at {self.location}" if self.backend == "etcd" else f"SQLite store {self.location}"


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_atomically(path: str, lines: Iterable[str]) -> int:
    """Write the lines to `path` via a temporary file, synced and renamed; returns bytes written."""
    partial = f"{path}.partial"
    size = 0
    with open(partial, "w", encoding="utf-8") as f:
        for line in lines:
            size += f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return size


async def snapshot(target: Target, path: str, fmt: str, prefix: str) -> str:
    """Take a snapshot of `target` into `path`; returns a one-line summary."""
    if fmt == "auto":
        fmt = "sqlite" if target.backend == "sqlite" else "jsonl"
    if fmt == "sqlite":
        if target.backend != "sqlite":
            raise SnapshotError("--format sqlite needs a SQLite store; use --format jsonl for etcd")
        source = store_mod.open_sqlite_readonly(target.location)
        try:
            store_mod.sqlite_backup(source, path)
        finally:
            source.close()
        items, revision = store_mod.read_sqlite_store(path, prefix)
        return (f"snapshot of {target.describe()} at revision {revision}: {len(items)} keys under {prefix}, "
                f"full history, {os.path.getsize(path)} bytes -> {path}")
    if target.backend == "sqlite":  # jsonl from a file: read it without opening it for writing
        items, revision = store_mod.read_sqlite_store(target.location, prefix)
    else:
        store = store_mod.open_store(target.location, "etcd")
        try:
            items, revision = await store.list(prefix)
        finally:
            await store.aclose()
    size = write_atomically(path, encode_snapshot(items, revision, target.backend, prefix, now_rfc3339()))
    return (f"snapshot of {target.describe()} at revision {revision}: {len(items)} keys under {prefix}, "
            f"{size} bytes -> {path}")


def read_snapshot(path: str) -> tuple[str, Snapshot]:
    """("sqlite" | "jsonl", the live keys) of a snapshot file, fully checked."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no snapshot at {path}")
    if store_mod.is_sqlite_file(path):
        db = store_mod.open_sqlite_readonly(path)
        try:
            problem = db.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            db.close()
        if problem != "ok":
            raise SnapshotError(f"{path}: damaged SQLite snapshot: {problem}")
        items, revision = store_mod.read_sqlite_store(path, "")
        return "sqlite", Snapshot("sqlite", "", revision, items)
    with open(path, encoding="utf-8") as f:
        try:
            return "jsonl", decode_snapshot(f)
        except UnicodeDecodeError:
            raise SnapshotError(f"{path}: neither a SQLite file nor a JSON-lines snapshot") from None


async def _require_empty(store, target: Target, prefix: str) -> None:
    items, revision = await store.list(prefix)
    if items:
        raise SnapshotError(f"{target.describe()} is not empty ({len(items)} keys under {prefix!r}, revision "
                            f"{revision}): restore only fills an empty store (stop the API server and move "
                            "the file aside, or use a fresh etcd)")


async def restore(target: Target, path: str) -> str:
    fmt, snap = read_snapshot(path)
    prefix = snap.prefix
    if target.backend == "sqlite" and os.path.exists(target.location) and os.path.getsize(target.location):
        _, revision = store_mod.read_sqlite_store(target.location)
        if revision:
            raise SnapshotError(f"{target.describe()} is not empty (revision {revision}): restore only fills "
                                "an empty store (stop the API server and move the file aside)")
        for leftover in (target.location, f"{target.location}-wal", f"{target.location}-shm"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    if fmt == "sqlite" and target.backend == "sqlite":  # the file itself, history and revisions kept
        os.makedirs(os.path.dirname(os.path.abspath(target.location)), exist_ok=True)
        source = store_mod.open_sqlite_readonly(path)
        try:
            store_mod.sqlite_backup(source, target.location)
        finally:
            source.close()
        how = "copied with its history"
    else:
        await _replay(target, snap)
        how = "replayed (new revisions)"
    await _verify(target, snap)
    return f"restored {len(snap.items)} keys from {path} (revision {snap.revision}) into {target.describe()}: {how}"


async def _replay(target: Target, snap: Snapshot) -> None:
    if target.backend == "sqlite":
        os.makedirs(os.path.dirname(os.path.abspath(target.location)), exist_ok=True)
    store = store_mod.open_store(target.location, target.backend)
    try:
        await _require_empty(store, target, snap.prefix)
        for kv in snap.items:
            await store.create(kv.key, kv.value)
    finally:
        await store.aclose()


async def _verify(target: Target, snap: Snapshot) -> None:
    """Read back what the store now holds under the snapshot's prefix: exactly the snapshot."""
    store = store_mod.open_store(target.location, target.backend)
    try:
        items, _ = await store.list(snap.prefix)
    finally:
        await store.aclose()
    if [(kv.key, kv.value) for kv in items] != [(kv.key, kv.value) for kv in snap.items]:
        raise SnapshotError(f"after restore, {target.describe()} holds {len(items)} keys under {snap.prefix!r}, "
                            f"not the snapshot's {len(snap.items)}")


async def status(target: Target, prefix: str) -> str:
    if target.backend == "sqlite" and not os.path.exists(target.location):
        raise FileNotFoundError(f"no SQLite store at {target.location}")
    store = store_mod.open_store(target.location, target.backend)
    try:
        items, revision = await store.list(prefix)
        lines = [f"store:      {target.describe()}",
                 f"revision:   {revision}",
                 f"compacted:  {await store.compacted_revision()}",
                 f"keys:       {len(items)} under {prefix}"]
        if target.backend == "sqlite":
            lines.append(f"file size:  {store.file_size()} bytes (database and WAL)")
        else:
            lines.append(f"db size:    {await store.db_size()} bytes (etcd backend file)")
        return "\n".join(lines)
    finally:
        await store.aclose()


async def compact(target: Target, keep_revisions: int, defragment: bool) -> str:
    if target.backend == "sqlite" and not os.path.exists(target.location):
        raise FileNotFoundError(f"no SQLite store at {target.location}")
    store = store_mod.open_store(target.location, target.backend)
    try:
        current = await store.current_revision()
        before = store.file_size() if target.backend == "sqlite" else await store.db_size()
        removed = await store.compact(max(0, current - keep_revisions))
        if defragment and target.backend == "etcd":
            await store.defragment()
        after = store.file_size() if target.backend == "sqlite" else await store.db_size()
        unit = "rows" if target.backend == "sqlite" else "revisions"
        return (f"compacted {target.describe()} up to revision {max(0, current - keep_revisions)} (current {current}): "
                f"{removed} {unit} forgotten; size {before} -> {after} bytes")
    finally:
        await store.aclose()


# =============================================================================================
# CLI
# =============================================================================================

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="netplane store", description="back up, restore, inspect and "
                                     "compact the API server's store")
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str, with_file: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_)
        if with_file:
            sub.add_argument("file", metavar="FILE")
        where = sub.add_mutually_exclusive_group()
        where.add_argument("--db", help=f"a SQLite store file (default: the lab's, {default_db()})")
        where.add_argument("--etcd-endpoints", metavar="URL", help="etcd client URLs, comma-separated")
        return sub

    snap = add("snapshot", "write a consistent snapshot of the store to FILE")
    snap.add_argument("--format", choices=["auto", "sqlite", "jsonl"], default="auto",
                      help="sqlite: the whole file (SQLite only); jsonl: portable JSON lines "
                           "(default: sqlite for SQLite, jsonl for etcd)")
    snap.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"keys to dump in jsonl (default {DEFAULT_PREFIX})")
    add("restore", "fill an empty store from the snapshot in FILE")
    stat = add("status", "show the store's revision, compaction and size", with_file=False)
    stat.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"keys to count (default {DEFAULT_PREFIX})")
    comp = add("compact", "forget old revisions now and give the space back", with_file=False)
    comp.add_argument("--keep-revisions", type=int, default=1000,
                      help="revisions of history to keep for watchers (default 1000)")
    comp.add_argument("--defragment", action="store_true", help="etcd: also defragment (blocks it briefly)")
    args = parser.parse_args(argv)
    if getattr(args, "keep_revisions", 0) < 0:
        parser.error("--keep-revisions: must be 0 or more")
    return args


def target_of(args: argparse.Namespace) -> Target:
    if args.etcd_endpoints:
        return Target("etcd", args.etcd_endpoints)
    return Target("sqlite", args.db or default_db())


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    target = target_of(args)
    try:
        if args.command == "snapshot":
            summary = asyncio.run(snapshot(target, args.file, args.format, args.prefix))
        elif args.command == "restore":
            summary = asyncio.run(restore(target, args.file))
        elif args.command == "status":
            summary = asyncio.run(status(target, args.prefix))
        else:
            summary = asyncio.run(compact(target, args.keep_revisions, args.defragment))
    except (OSError, ValueError, StoreError) as err:
        print(f"netplane store {args.command}: error: {err}", file=sys.stderr)
        return 1
    print(summary)
    return 0
