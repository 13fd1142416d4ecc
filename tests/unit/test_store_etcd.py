"""etcd backend specifics: the gateway mapping (pure), paging, endpoint failover, LocalEtcd cleanup."""
from __future__ import annotations

import asyncio
import base64

import pytest

from netplane.store import Gone, open_store
from netplane.store_etcd import (COMPACTION_MARKER, EtcdError, EtcdStore, LocalEtcd, _watch_step, free_port,
                                 key_range, parse_endpoints)
from tests.unit.test_store_contract import SKIP_ETCD


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_endpoints_accept_lists_bare_host_ports_and_etcd_urls():
    assert parse_endpoints("http://a:2379, etcd://b:2379,c:2379/") == ["http://a:2379", "http://b:2379", "http://c:2379"]
    with pytest.raises(ValueError, match="no etcd endpoint"):
        parse_endpoints(" , ")
    with pytest.raises(ValueError, match="expected http"):
        parse_endpoints("ftp://a:21")


def test_key_range_covers_exactly_the_prefix():
    assert key_range("/a/") == {"key": b64("/a/"), "range_end": b64("/a0")}
    assert key_range("") == {"key": "AA==", "range_end": "AA=="}  # every key
    end = base64.b64decode(key_range("/a\xff")["range_end"])  # UTF-8 bytes, incremented bytewise
    assert end == "/a\xff".encode()[:-1] + bytes(["/a\xff".encode()[-1] + 1])


def test_open_store_picks_the_backend_from_the_location_or_the_flag():
    assert isinstance(open_store("http://127.0.0.1:2379"), EtcdStore)
    assert isinstance(open_store("127.0.0.1:2379", "etcd"), EtcdStore)
    with pytest.raises(ValueError, match="expected sqlite or etcd"):
        open_store("x", "zookeeper")


def put(key: str, value: str, revision: int, version: int, prev: str | None = None) -> dict:
    event = {"kv": {"key": b64(key), "value": b64(value), "mod_revision": str(revision),
                    "create_revision": str(revision - version + 1), "version": str(version)}}
    if prev is not None:
        event["prev_kv"] = {"key": b64(key), "value": b64(prev)}
    return event


def test_watch_messages_become_our_events_and_positions():
    created = {"result": {"header": {"revision": "9"}, "created": True}}
    assert _watch_step(created, 4) == ([], 4)  # creation says nothing about what was delivered
    batch = {"result": {"header": {"revision": "9"}, "events": [
        put("/r/a", "1", 5, 1),
        put("/r/a", "2", 6, 2, prev="1"),
        {"type": "DELETE", "kv": {"key": b64("/r/a"), "mod_revision": "7"}, "prev_kv": {"value": b64("2")}},
        put(COMPACTION_MARKER, "6", 8, 1)]}}
    events, position = _watch_step(batch, 4)
    assert [(e.type, e.key, e.value, e.revision, e.prev_value) for e in events] == [
        ("ADDED", "/r/a", b"1", 5, None), ("MODIFIED", "/r/a", b"2", 6, b"1"), ("DELETED", "/r/a", b"2", 7, b"2")]
    assert position == 8
    progress = {"result": {"header": {"revision": "12"}}}
    assert _watch_step(progress, 8) == ([], 12)
    with pytest.raises(Gone) as gone:
        _watch_step({"result": {"canceled": True, "compact_revision": "20"}}, 12)
    assert (gone.value.revision, gone.value.compacted) == (12, 19)
    with pytest.raises(EtcdError, match="permission denied"):
        _watch_step({"result": {"canceled": True, "cancel_reason": "permission denied"}}, 12)


@SKIP_ETCD
def test_a_list_larger_than_a_page_is_read_at_one_revision(tmp_path):
    with LocalEtcd(str(tmp_path / "etcd")) as url:
        async def scenario():
            store = EtcdStore(url, page_size=4)
            try:
                for i in range(10):
                    await store.create(f"/p/{i:02d}", str(i).encode())
                await store.create("/q/other", b"x")
                items, revision = await store.list("/p/")
                assert [kv.key for kv in items] == [f"/p/{i:02d}" for i in range(10)]
                assert revision == await store.current_revision()
            finally:
                await store.aclose()
        asyncio.run(scenario())


@SKIP_ETCD
def test_a_dead_endpoint_is_skipped_and_no_endpoint_is_a_clear_error(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    with LocalEtcd(str(tmp_path / "etcd")) as url:
        async def scenario():
            store = EtcdStore(f"{dead},{url}")
            try:
                revision = await store.create("/f/a", b"1")
                assert (await store.get("/f/a")).mod_revision == revision
            finally:
                await store.aclose()
        asyncio.run(scenario())

    async def nothing_answers():
        store = EtcdStore(dead)
        try:
            await store.get("/f/a")
        finally:
            await store.aclose()
    with pytest.raises(EtcdError, match="no etcd endpoint answers"):
        asyncio.run(nothing_answers())


@SKIP_ETCD
def test_compacting_at_the_newest_revision_hides_its_marker(tmp_path):
    with LocalEtcd(str(tmp_path / "etcd")) as url:
        async def scenario():
            store = EtcdStore(url)
            try:
                newest = await store.create("/m/a", b"1")
                await store.compact(newest)
                assert await store.compacted_revision() == newest
                assert [kv.key for kv in (await store.list(""))[0]] == ["/m/a"]
            finally:
                await store.aclose()
        asyncio.run(scenario())


@SKIP_ETCD
def test_local_etcd_stops_its_process_when_the_body_fails(tmp_path):
    etcd = LocalEtcd(str(tmp_path / "etcd"))
    with pytest.raises(RuntimeError, match="boom"):
        with etcd:
            proc = etcd.proc
            raise RuntimeError("boom")
    assert proc.poll() is not None and etcd.proc is None


@SKIP_ETCD
def test_the_store_carries_on_after_etcd_restarts_with_its_data(tmp_path):
    etcd = LocalEtcd(str(tmp_path / "etcd"))

    async def scenario():
        store = EtcdStore(etcd.url)
        try:
            first = await store.create("/s/a", b"1")
            etcd.stop()
            etcd.start()
            assert (await store.get("/s/a")).mod_revision == first
            second = await store.update("/s/a", b"2", first)
            assert second > first
        finally:
            await store.aclose()
    etcd.start()
    try:
        asyncio.run(scenario())
    finally:
        etcd.stop()
