"""Store benchmark: embedded SQLite against etcd v3, the same workload, side by side in one run.

    .venv/bin/python bench/store.py [--creates 2000] [--concurrency 16] [--list-objects 1000]
                                    [--lists 50] [--watch-writes 300] [--skip-etcd]

For each backend, through the Store interface the API server uses (netplane.store /
netplane.store_etcd), with ConfigMap-sized values (~1 KB of JSON) under API-server keys:
- creates/s, one client writing one at a time, and --concurrency clients at once;
- list latency: p50/p99 of listing --list-objects objects (one consistent read);
- watch delivery latency: p50/p99 from just before a write to its event arriving at a watcher
  on the same prefix (one write at a time, each awaited).
SQLite runs on a file in a temporary directory; etcd (Debian's etcd-server) is started on
loopback with a temporary data dir and stopped afterwards. Both persist every acknowledged write
(SQLite in WAL mode, synchronous=NORMAL: safe against a crash of the process; etcd fsyncs its
WAL: safe against a power cut too), which is most of the difference in write rate.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from netplane.store import SQLiteStore, Store
from netplane.store_etcd import EtcdStore, LocalEtcd

PREFIX = "/registry/core/configmaps/bench/"


@dataclass
class Figures:
    creates_per_s: float
    concurrent_creates_per_s: float
    list_p50_ms: float
    list_p99_ms: float
    watch_p50_ms: float
    watch_p99_ms: float


def value(name: str, serial: int) -> bytes:
    return json.dumps({"apiVersion": "v1", "kind": "ConfigMap",
                       "metadata": {"name": name, "namespace": "bench", "uid": f"{serial:032x}",
                                    "labels": {"app": "bench", "tier": "store"}},
                       "data": {"payload": "x" * 800, "serial": str(serial)}}, separators=(",", ":")).encode()


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def creates_per_second(store: Store, prefix: str, count: int, concurrency: int) -> float:
    names = [f"{prefix}obj-{i:06d}" for i in range(count)]
    queue = iter(enumerate(names))

    async def client():
        for serial, key in queue:
            await store.create(key, value(key, serial))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


async def list_latency(store: Store, objects: int, lists: int) -> tuple[float, float]:
    prefix = PREFIX + "list/"
    existing, _ = await store.list(prefix)
    for i in range(len(existing), objects):
        await store.create(f"{prefix}obj-{i:06d}", value(f"obj-{i}", i))
    samples = []
    for _ in range(lists):
        started = time.perf_counter()
        items, _ = await store.list(prefix)
        samples.append(time.perf_counter() - started)
        assert len(items) == objects, (len(items), objects)
    return percentile(samples, 0.5) * 1000, percentile(samples, 0.99) * 1000


async def watch_latency(store: Store, writes: int) -> tuple[float, float]:
    key = PREFIX + "watched/obj"
    revision = await store.create(key, value("watched", 0))
    events = store.watch(PREFIX + "watched/", revision)
    samples = []
    try:
        for serial in range(1, writes + 1):
            started = time.perf_counter()
            revision = await store.update(key, value("watched", serial), revision)
            while True:
                event = await asyncio.wait_for(anext(events), 10)
                if event.revision == revision:
                    break
            samples.append(time.perf_counter() - started)
    finally:
        await events.aclose()
    return percentile(samples, 0.5) * 1000, percentile(samples, 0.99) * 1000


async def measure(store: Store, args: argparse.Namespace) -> Figures:
    try:
        sequential = await creates_per_second(store, PREFIX + "seq/", args.creates, 1)
        concurrent = await creates_per_second(store, PREFIX + "conc/", args.creates, args.concurrency)
        list_p50, list_p99 = await list_latency(store, args.list_objects, args.lists)
        watch_p50, watch_p99 = await watch_latency(store, args.watch_writes)
        return Figures(sequential, concurrent, list_p50, list_p99, watch_p50, watch_p99)
    finally:
        await store.aclose()


def print_table(sqlite: Figures, etcd: Figures | None, args: argparse.Namespace) -> None:
    rows = [
        ("creates/s, 1 client", "creates_per_s", "{:.0f}"),
        (f"creates/s, {args.concurrency} clients", "concurrent_creates_per_s", "{:.0f}"),
        (f"list {args.list_objects} objects p50 (ms)", "list_p50_ms", "{:.2f}"),
        (f"list {args.list_objects} objects p99 (ms)", "list_p99_ms", "{:.2f}"),
        ("watch delivery p50 (ms)", "watch_p50_ms", "{:.3f}"),
        ("watch delivery p99 (ms)", "watch_p99_ms", "{:.3f}"),
    ]
    print(f"{'':<32}{'sqlite':>12}{'etcd':>12}{'etcd/sqlite':>14}")
    for label, field, fmt in rows:
        ours = getattr(sqlite, field)
        line = f"{label:<32}{fmt.format(ours):>12}"
        if etcd is not None:
            theirs = getattr(etcd, field)
            line += f"{fmt.format(theirs):>12}{theirs / ours:>13.2f}x"
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--creates", type=int, default=2000, help="objects created per create measurement")
    parser.add_argument("--concurrency", type=int, default=16, help="clients in the concurrent create run")
    parser.add_argument("--list-objects", type=int, default=1000)
    parser.add_argument("--lists", type=int, default=50, help="list calls timed")
    parser.add_argument("--watch-writes", type=int, default=300, help="writes timed to their watch event")
    parser.add_argument("--skip-etcd", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="netplane-bench-store-"))
    try:
        print(f"sqlite: {work / 'store.db'}", flush=True)
        sqlite = asyncio.run(measure(SQLiteStore(str(work / "store.db")), args))
        etcd = None
        if args.skip_etcd:
            print("etcd: skipped (--skip-etcd)")
        elif shutil.which("etcd") is None:
            print("etcd: not installed (apt-get install etcd-server); SQLite only")
        else:
            with LocalEtcd(str(work / "etcd")) as url:
                print(f"etcd: {url} (data in {work / 'etcd'})", flush=True)
                etcd = asyncio.run(measure(EtcdStore(url), args))
        print()
        print_table(sqlite, etcd, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
