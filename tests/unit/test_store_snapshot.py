"""`netplane store snapshot / restore / status / compact`: snapshot, wipe, restore, same objects."""
from __future__ import annotations

import asyncio
import json
import os
import shutil

import pytest

from netplane import storecmd
from netplane.store import KeyValue, SQLiteStore
from netplane.store_etcd import EtcdStore, LocalEtcd
from netplane.storecmd import SnapshotError, decode_snapshot, encode_snapshot
from tests.unit.test_store_contract import SKIP_ETCD


def cm(name: str, data: str) -> bytes:
    return json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "data": {"v": data},
                       "metadata": {"name": name, "namespace": "default"}}).encode()


async def populate(store) -> dict[str, bytes]:
    """Objects with some history (updates, a delete) and a key outside /registry/; returns the
    live /registry/ keys and values."""
    live = {}
    for i in range(40):
        key = f"/registry/core/configmaps/default/cm-{i:02d}"
        revision = await store.create(key, cm(f"cm-{i:02d}", "first"))
        if i % 3 == 0:
            await store.update(key, cm(f"cm-{i:02d}", "second"), revision)
        live[key] = cm(f"cm-{i:02d}", "second" if i % 3 == 0 else "first")
    await store.delete("/registry/core/configmaps/default/cm-07")
    del live["/registry/core/configmaps/default/cm-07"]
    await store.create("/registry/core/namespaces/default", b'{"kind":"Namespace"}')
    live["/registry/core/namespaces/default"] = b'{"kind":"Namespace"}'
    return live


async def contents(store, prefix: str = "/registry/") -> dict[str, bytes]:
    items, _ = await store.list(prefix)
    await store.aclose()
    return {kv.key: kv.value for kv in items}


def sqlite_contents(path: str) -> dict[str, bytes]:
    return asyncio.run(contents(SQLiteStore(path)))


def wipe_sqlite(path: str) -> None:
    for leftover in (path, f"{path}-wal", f"{path}-shm"):
        if os.path.exists(leftover):
            os.unlink(leftover)


def store_cli(*argv: str) -> int:
    return storecmd.main(list(argv))


# --- the format (pure) ---------------------------------------------------------------------------

def test_jsonl_round_trip_keeps_text_readable_and_binary_exact():
    items = [KeyValue("/registry/a", b'{"x":1}', 5, 3), KeyValue("/registry/b", b"\xff\x00binary", 6, 6)]
    lines = list(encode_snapshot(items, 9, "etcd", "/registry/", "2026-01-01T00:00:00Z"))
    assert json.loads(lines[1])["value"] == '{"x":1}' and "valueBase64" in json.loads(lines[2])
    snap = decode_snapshot(lines)
    assert (snap.source, snap.prefix, snap.revision, snap.items) == ("etcd", "/registry/", 9, items)


@pytest.mark.parametrize("mangle, message", [
    (lambda lines: lines[:-1], "truncated"),
    (lambda lines: lines[:1] + lines[2:], "end line counts 1 keys, found 0"),
    (lambda lines: lines[:2] + lines[1:], "appears twice"),
    (lambda lines: ['{"hello": 1}'] + lines[1:], "not a netplane snapshot"),
    (lambda lines: lines[:1] + ['{"key": "/k"}'] + lines[2:], "line 2: /k: no value"),
    (lambda lines: lines[:1] + ["{oops"] + lines[2:], "line 2: not JSON"),
    (lambda lines: [], "empty file"),
])
def test_a_damaged_snapshot_is_refused_with_the_line_and_the_reason(mangle, message):
    lines = list(encode_snapshot([KeyValue("/registry/a", b"v", 2, 2)], 2, "sqlite", "/registry/", "t"))
    with pytest.raises(SnapshotError, match=message):
        decode_snapshot(mangle(lines))


# --- SQLite ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["sqlite", "jsonl"])
def test_sqlite_snapshot_wipe_restore_gives_the_same_objects(tmp_path, capsys, fmt):
    db, snap = str(tmp_path / "store.db"), str(tmp_path / f"snap.{fmt}")

    async def setup():
        store = SQLiteStore(db)
        live = await populate(store)
        await store.create("/other/key", b"outside the API keyspace")
        return live, await store.current_revision(), store
    live, revision, writer = asyncio.run(setup())  # the writer stays open: an online snapshot
    assert store_cli("snapshot", snap, "--db", db, "--format", fmt) == 0
    assert f"at revision {revision}" in capsys.readouterr().out
    writer.close()
    wipe_sqlite(db)
    assert store_cli("restore", snap, "--db", db) == 0
    assert "restored" in capsys.readouterr().out
    assert sqlite_contents(db) == live
    restored_revision = asyncio.run(SQLiteStore(db).current_revision())
    if fmt == "sqlite":  # the file itself: history, revisions and keys outside /registry/ kept
        assert restored_revision == revision
        assert "/other/key" in asyncio.run(contents(SQLiteStore(db), "/"))
    else:
        assert restored_revision == len(live)


def test_restore_refuses_a_store_that_is_not_empty_and_changes_nothing(tmp_path, capsys):
    db, snap = str(tmp_path / "store.db"), str(tmp_path / "snap.db")

    async def setup():
        store = SQLiteStore(db)
        await populate(store)
        store.close()
    asyncio.run(setup())
    before = sqlite_contents(db)
    assert store_cli("snapshot", snap, "--db", db) == 0
    assert store_cli("restore", snap, "--db", db) == 1
    assert "is not empty" in capsys.readouterr().err
    assert sqlite_contents(db) == before


def test_a_truncated_snapshot_is_refused_before_anything_is_written(tmp_path, capsys):
    db, snap = str(tmp_path / "store.db"), str(tmp_path / "snap.jsonl")
    asyncio.run(populate(SQLiteStore(db)))
    assert store_cli("snapshot", snap, "--db", db, "--format", "jsonl") == 0
    with open(snap) as f:
        lines = f.readlines()
    with open(snap, "w") as f:
        f.writelines(lines[:-3])
    target = str(tmp_path / "empty.db")
    assert store_cli("restore", snap, "--db", target) == 1
    assert "truncated" in capsys.readouterr().err
    assert not os.path.exists(target)


def test_status_and_compact_report_revision_and_size(tmp_path, capsys):
    db = str(tmp_path / "store.db")

    async def churn():
        store = SQLiteStore(db)
        revision = await store.create("/registry/k", b"0")
        for i in range(3000):
            revision = await store.update("/registry/k", cm("k", str(i)), revision)
        store.close()
    asyncio.run(churn())
    assert store_cli("status", "--db", db) == 0
    out = capsys.readouterr().out
    assert "revision:   3001" in out and "compacted:  0" in out and "keys:       1 under /registry/" in out
    assert store_cli("compact", "--db", db, "--keep-revisions", "10") == 0
    out = capsys.readouterr().out
    assert "up to revision 2991" in out and "2990 rows forgotten" in out
    assert store_cli("status", "--db", db) == 0
    assert "compacted:  2991" in capsys.readouterr().out
    assert store_cli("status", "--db", str(tmp_path / "missing.db")) == 1
    assert "no SQLite store" in capsys.readouterr().err


# --- etcd ------------------------------------------------------------------------------------------

@SKIP_ETCD
def test_etcd_snapshot_wipe_restore_gives_the_same_objects(tmp_path, capsys):
    snap = str(tmp_path / "etcd.jsonl")
    with LocalEtcd(str(tmp_path / "etcd-a")) as url:
        live = asyncio.run(populate_and_close(url))
        assert store_cli("snapshot", snap, "--etcd-endpoints", url) == 0
        assert "40 keys under /registry/" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "etcd-a")  # the wipe: that etcd and its data are gone
    with LocalEtcd(str(tmp_path / "etcd-b")) as url:
        assert store_cli("restore", snap, "--etcd-endpoints", url) == 0
        assert asyncio.run(contents(EtcdStore(url))) == live
        assert store_cli("restore", snap, "--etcd-endpoints", url) == 1  # not empty any more
        assert "is not empty" in capsys.readouterr().err


async def populate_and_close(url: str) -> dict[str, bytes]:
    store = EtcdStore(url)
    try:
        return await populate(store)
    finally:
        await store.aclose()


@SKIP_ETCD
def test_a_sqlite_cluster_moves_to_etcd_and_back_through_snapshots(tmp_path, capsys):
    db, snap = str(tmp_path / "store.db"), str(tmp_path / "store.db.snap")
    live = asyncio.run(populate(SQLiteStore(db)))
    assert store_cli("snapshot", snap, "--db", db) == 0  # the SQLite format: restored into etcd by replay
    with LocalEtcd(str(tmp_path / "etcd")) as url:
        assert store_cli("restore", snap, "--etcd-endpoints", url) == 0
        assert asyncio.run(contents(EtcdStore(url))) == live
        back = str(tmp_path / "back.jsonl")
        assert store_cli("snapshot", back, "--etcd-endpoints", url) == 0
    fresh = str(tmp_path / "fresh.db")
    assert store_cli("restore", back, "--db", fresh) == 0
    assert sqlite_contents(fresh) == live
