"""The one way to run a command, in the current namespace or in a named network namespace.

Commands are argument lists, never shell strings. A failure raises CommandError carrying the
command and its output. Named namespaces live in /run/netns (`ip netns add`), and everything
netplane creates is named with the marker prefix `np-` so clean-up can find it by name.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Iterator, Sequence

MARKER = "np-"
NETNS_DIR = "/run/netns"


class CommandError(RuntimeError):
    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        output = (stderr or stdout).strip()
        super().__init__(f"command {' '.join(self.argv)!r} failed with exit code {returncode}: {output}")


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """The argv that runs `argv` inside the named network namespace (or as is, when None).

    `ip netns exec` also bind-mounts /etc/netns/<name>/* over /etc (resolv.conf, hosts), which
    is how pods get their own resolv.conf.
    """
    if not netns:
        return list(argv)
    return ["ip", "netns", "exec", netns, *argv]


def enter(netns: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs `argv` in the named namespace's network only (no new mount namespace).

    For daemons that create namespaces themselves (the node agent): `ip netns exec` would give
    them a private mount namespace, hiding the /run/netns mounts they make from everyone else.
    """
    return ["nsenter", f"--net={os.path.join(NETNS_DIR, netns)}", "--", *argv]


def run(argv: Sequence[str], netns: str | None = None, check: bool = True,
        input: str | None = None, timeout: float | None = 60) -> subprocess.CompletedProcess:
    full = in_netns(netns, argv)
    proc = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise CommandError(full, proc.returncode, proc.stdout, proc.stderr)
    return proc


@contextlib.contextmanager
def inside(netns: str | None) -> Iterator[None]:
    """Run the block with this thread in the named network namespace (setns(2) applies to the
    calling thread only), for in-process netlink work: a socket made there stays there."""
    if not netns:
        yield
        return
    from netplane.cni.netlink import InNamespace
    target = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        with InNamespace(target):
            yield
    finally:
        os.close(target)


def exists(netns: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, netns))


def add(netns: str) -> None:
    """Create a named namespace with loopback up; already existing is fine."""
    if not exists(netns):
        run(["ip", "netns", "add", netns])
    run(["ip", "link", "set", "lo", "up"], netns=netns)


def delete(netns: str) -> None:
    """Kill every process in the namespace, then remove it; missing is fine."""
    if not exists(netns):
        return
    kill_processes(netns)
    run(["ip", "netns", "delete", netns], check=False)


def pids(netns: str) -> list[int]:
    proc = run(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def kill_processes(netns: str, sig: int = 9) -> None:
    for pid in pids(netns):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def list_named(prefix: str = MARKER) -> list[str]:
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))
