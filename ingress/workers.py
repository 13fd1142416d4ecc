"""`--workers N`: a supervisor process and N workers, one event loop each.

Each worker is `netplane ingress serve` itself with a hidden `--ready-fd`: it binds the listen ports with
SO_REUSEPORT (the kernel spreads new connections across them), keeps its own watch and route table,
and writes `ready` on the fd once its first table is built. The supervisor serves /healthz (200 when
every worker is ready) and /metrics (the sum of the counters each worker sends every second on the
same pipe), and restarts a worker that dies; SIGTERM is passed on to all of them.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys

from netplane import daemon
from netplane.daemon import log_fields
from netplane.ingress.cli import COUNTER_HELP, register_metrics

log = logging.getLogger("ingress")


class Worker:
    def __init__(self, index: int, argv: list[str]):
        self.index = index
        self.argv = argv
        self.process: asyncio.subprocess.Process | None = None
        self.ready = False
        self.ever_ready = False
        self.ready_watch: asyncio.Task | None = None   # held: the loop keeps only weak task references
        self.stats: dict = {}   # its last report (Stats.snapshot)

    async def start(self) -> None:
        read_fd, write_fd = os.pipe()
        argv = [sys.executable, "-m", "netplane", "ingress", "serve", *self.argv,
                "--workers", "1", "--ready-fd", str(write_fd)]
        self.ready = False
        self.process = await asyncio.create_subprocess_exec(*argv, pass_fds=(write_fd,))
        os.close(write_fd)
        self.ready_watch = asyncio.get_running_loop().create_task(self._watch_ready(read_fd))
        log_fields(log, logging.INFO, "worker started", worker=self.index, pid=self.process.pid)

    async def _watch_ready(self, read_fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                    os.fdopen(read_fd, "rb", 0))
        try:
            if (await reader.readline()).strip() == b"ready":
                self.ready = self.ever_ready = True
            while line := await reader.readline():  # then its counters, every second
                if line.startswith(b"stats "):
                    self.stats = json.loads(line[6:])
        except (ValueError, asyncio.LimitOverrunError) as err:
            log_fields(log, logging.WARNING, "bad stats line from worker", worker=self.index, error=str(err))
        finally:
            transport.close()


def add_stats(total: dict, stats: dict, gauges: bool = True) -> None:
    """Add one worker's Stats.snapshot() into `total` (counters; the open-connections gauge too)."""
    for name in COUNTER_HELP:
        total[name] = total.get(name, 0) + stats.get(name, 0)
    responses = total.setdefault("responses", {})
    for code, count in stats.get("responses", {}).items():
        responses[code] = responses.get(code, 0) + count
    if gauges:
        total["open_connections"] = total.get("open_connections", 0) + stats.get("open_connections", 0)


def worker_argv(argv: list[str]) -> list[str]:
    """The serve arguments minus the ones only the supervisor uses (health port, worker count)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "serve" and i == 0:
            continue
        name = arg.split("=", 1)[0]
        if name in ("--workers", "--health-listen"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def without_publishing(argv: list[str]) -> list[str]:
    """`argv` minus --publish-service: one worker (the first) writes Ingress status, not all of them."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.split("=", 1)[0] == "--publish-service":
            skip = "=" not in arg
        else:
            out.append(arg)
    return out


def supervise(args, argv: list[str]) -> int:
    workers = [Worker(i, worker_argv(argv) if i == 0 else without_publishing(worker_argv(argv)))
               for i in range(args.workers)]

    retired: dict = {}   # counters of worker processes that exited, so the sums never go down

    def healthy() -> tuple[bool, str]:
        ready = sum(w.ready for w in workers)
        return ready == len(workers), f"{ready}/{len(workers)} workers ready"

    def snapshot() -> dict:
        total = {"open_connections": 0}
        add_stats(total, retired, gauges=False)
        for worker in workers:
            add_stats(total, worker.stats)
        return total

    register_metrics(snapshot)

    async def main(stop: asyncio.Event) -> None:
        for worker in workers:
            await worker.start()
        failed = await _supervise(workers, stop, retired)
        for worker in workers:
            if worker.process and worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in workers:
            if worker.process:
                try:
                    await asyncio.wait_for(worker.process.wait(), 10)
                except asyncio.TimeoutError:
                    worker.process.kill()
                    await worker.process.wait()
        if failed:
            raise SystemExit(1)

    return daemon.run(main, "ingress", args.health_listen, healthy)


async def _supervise(workers: list[Worker], stop: asyncio.Event, retired: dict) -> bool:
    """Restart workers that die; True when one dies before it was ever ready (bad config/port)."""
    while not stop.is_set():
        waits = {asyncio.ensure_future(w.process.wait()): w for w in workers}
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([*waits, stopper], return_when=asyncio.FIRST_COMPLETED)
        for fut in (*waits, stopper):
            if fut not in done:
                fut.cancel()
        if stop.is_set():
            return False
        for fut in done:
            worker = waits.get(fut)
            if worker is None:
                continue
            log_fields(log, logging.WARNING, "worker exited", worker=worker.index,
                       code=worker.process.returncode)
            if not worker.ever_ready:
                log.error("worker %d failed before it was ready; stopping", worker.index)
                stop.set()
                return True
            await worker.ready_watch  # its last report, then it counts as retired
            add_stats(retired, worker.stats, gauges=False)
            worker.stats = {}
            await asyncio.sleep(0.5)
            await worker.start()
    return False
