"""Shared fixtures. Kernel tests create namespaces named with our marker and remove them even on failure."""
from __future__ import annotations

import os
import shutil
import uuid

import pytest

from netplane import netns

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2 for network namespaces")


def unique_name(prefix: str) -> str:
    """A marker-prefixed unique name, short enough for a link name (15 chars)."""
    return f"np-{prefix}-{uuid.uuid4().hex[:6]}"[:15]


def host_rule_leftovers() -> list[str]:
    """Our nft tables and NP- iptables chains (nft and legacy) in this (the host's) namespace."""
    import subprocess
    found = []
    if shutil.which("nft"):
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        found += [f"nft {line}" for line in tables.splitlines() if "netplane" in line]
    for save in ("iptables-save", "ip6tables-save", "iptables-legacy-save", "ip6tables-legacy-save"):
        if shutil.which(save):
            out = subprocess.run([save], capture_output=True, text=True).stdout
            found += [f"{save} {line.split()[0]}" for line in out.splitlines() if line.startswith(":NP-")]
    return found


def marked_leftovers() -> set[str]:
    """Everything on the machine that carries our marker: namespaces and links named np-*, the
    netplane nft tables and NP- iptables chains of the host namespace, the lab's directory."""
    import subprocess
    found = {f"netns {n}" for n in netns.list_named()}
    found |= {f"link {n}" for n in os.listdir("/sys/class/net") if n.startswith(netns.MARKER)}
    if os.geteuid() == 0:
        found |= set(host_rule_leftovers())
    if os.path.exists("/var/lib/netplane/lab"):
        found.add("dir /var/lib/netplane/lab")
    return found


@pytest.fixture(scope="session", autouse=True)
def the_run_leaves_the_machine_as_it_found_it():
    """Fails the session (an error at teardown) if any test left something of ours behind."""
    before = marked_leftovers()
    yield
    left = sorted(marked_leftovers() - before)
    assert not left, f"the test run left these behind: {left}"


@pytest.fixture
def make_netns():
    """make_netns('cli') -> name of a fresh namespace (loopback up); all removed after the test."""
    made: list[str] = []

    def make(prefix: str = "t") -> str:
        name = unique_name(prefix)
        netns.add(name)
        made.append(name)
        return name

    yield make
    for name in reversed(made):
        netns.delete(name)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningAPIServer:
    """A real `netplane apiserver` on loopback with a temporary store, and a sync call helper."""

    def __init__(self, tmp_path):
        import subprocess
        import sys
        import time
        import urllib.request

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.processes: list = []
        self.start([sys.executable, "-m", "netplane", "apiserver", "--listen", f"127.0.0.1:{self.port}",
                    "--db", str(tmp_path / "store.db"), "--advertise-address", "192.0.2.10"],
                   tmp_path / "apiserver.log")
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"apiserver did not start: {(tmp_path / 'apiserver.log').read_text()}")
                time.sleep(0.05)
        self._subprocess = subprocess

    def start(self, argv, log_path):
        """Start another process (a controller, a daemon) that is stopped with the server."""
        import subprocess
        log = open(log_path, "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.processes.append(proc)
        return proc

    def call(self, method: str, *args, **kwargs):
        import asyncio
        from netplane.client import Client

        async def run():
            async with Client(self.url) as client:
                return await getattr(client, method)(*args, **kwargs)
        return asyncio.run(run())

    def stop(self):
        for proc in reversed(self.processes):
            proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout=5)
            except Exception:
                proc.kill()
                proc.wait()


@pytest.fixture
def api_server(tmp_path):
    server = RunningAPIServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()
