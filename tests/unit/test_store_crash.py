"""kill -9 of a real `netplane apiserver` in the middle of writes loses no acknowledged write.

The server runs as a subprocess on loopback over each store backend; eight clients create
ConfigMaps over HTTP as fast as they can; once a few hundred are acknowledged the server gets
SIGKILL with requests in flight. A new server on the same SQLite file / the same etcd must
serve every object that was acknowledged (201), with its data.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request

import aiohttp

from netplane.store_etcd import free_port
from tests.unit.test_store_contract import Backend, backend  # noqa: F401 - the parametrized fixture

WRITERS = 8
ACKED_BEFORE_KILL = 300


class APIServerProcess:
    """`netplane apiserver` as a child process on 127.0.0.1, over the given backend."""

    def __init__(self, backend: Backend, log_path: str):
        self.backend = backend
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        store = (["--store", "etcd", "--etcd-endpoints", self.backend.location] if self.backend.name == "etcd"
                 else ["--store", "sqlite", "--db", self.backend.location])
        return [sys.executable, "-m", "netplane", "apiserver", "--listen", f"127.0.0.1:{self.port}",
                "--advertise-address", "127.0.0.1", *store]

    def start(self, timeout: float = 20.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self._ready():
            assert self.proc.poll() is None, f"apiserver exited: {open(self.log_path).read()[-2000:]}"
            assert time.monotonic() < deadline, "apiserver not ready in time"
            time.sleep(0.05)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(10)


def config_map(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default"},
            "data": {"written-as": name}}


async def write_until_killed(server: APIServerProcess) -> tuple[set[str], int]:
    """Create ConfigMaps from WRITERS clients; SIGKILL the server once enough are acknowledged.
    Returns (acknowledged names, requests in flight at the kill)."""
    acked: set[str] = set()
    in_flight = 0
    killed = asyncio.Event()
    at_kill = []
    path = server.url + "/api/v1/namespaces/default/configmaps"

    async def writer(index: int, http: aiohttp.ClientSession) -> None:
        nonlocal in_flight
        for serial in range(100_000):
            name = f"w{index}-{serial}"
            in_flight += 1
            try:
                async with http.post(path, json=config_map(name)) as resp:
                    await resp.read()
                    if resp.status == 201:
                        acked.add(name)
            except aiohttp.ClientError:
                return  # the server is gone
            finally:
                in_flight -= 1
            if len(acked) >= ACKED_BEFORE_KILL and not killed.is_set():
                killed.set()
                at_kill.append(in_flight)  # the others' requests, sent and not yet answered
                server.kill()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        await asyncio.gather(*(writer(i, http) for i in range(WRITERS)))
    return acked, at_kill[0]


async def stored_config_maps(url: str) -> dict[str, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/api/v1/namespaces/default/configmaps") as resp:
            assert resp.status == 200
            return {item["metadata"]["name"]: item["data"] for item in (await resp.json())["items"]}


def test_kill_9_of_the_api_server_mid_write_loses_no_acknowledged_write(backend, tmp_path):
    first = APIServerProcess(backend, str(tmp_path / "apiserver-1.log"))
    second = APIServerProcess(backend, str(tmp_path / "apiserver-2.log"))
    try:
        first.start()
        acked, in_flight = asyncio.run(write_until_killed(first))
        assert first.proc.returncode == -signal.SIGKILL
        assert len(acked) >= ACKED_BEFORE_KILL and in_flight >= 1  # killed with writes under way
        second.start()
        stored = asyncio.run(stored_config_maps(second.url))
        missing = acked - stored.keys()
        assert not missing, f"acknowledged but lost: {sorted(missing)[:10]}"
        assert all(stored[name] == {"written-as": name} for name in acked)
    finally:
        first.kill()
        second.kill(signal.SIGTERM)
