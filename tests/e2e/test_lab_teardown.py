"""`lab down` leaves nothing: after a `kill -9` of `lab up` halfway (at several points), twice in a row,
and after a normal `up`; and `lab up` refuses, saying why, while a lab (or a crashed one's remains) is there.

Nothing of ours means: no lab namespace, link, /run/netns mount, /etc/netns entry, lab directory, no
nft table or iptables chain of ours in the host namespace, and none of the processes that were running.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from netplane import lab, netns
from netplane.demo import netplane
from tests.conftest import host_rule_leftovers, needs_root

pytestmark = [pytest.mark.e2e, needs_root]


def lab_processes() -> set[int]:
    """Every process in a lab namespace or carrying the lab's marker."""
    in_namespaces = {pid for name in netns.list_named() if lab.is_lab_name(name) for pid in netns.pids(name)}
    return in_namespaces | lab._marked_pids()


def leftovers(pids: set[int] = frozenset()) -> list[str]:
    found = lab.leftovers() + host_rule_leftovers()
    found += [f"process {pid}" for pid in sorted(pids) if lab._alive(pid)]
    return found


def down_leaves_nothing(pids: set[int]) -> None:
    first = netplane("lab", "down", check=False)
    assert first.returncode == 0, first.stdout + first.stderr
    assert leftovers(pids) == []
    second = netplane("lab", "down", check=False)
    assert second.returncode == 0 and "nothing" in second.stdout, second.stdout
    assert leftovers(pids) == []


@pytest.fixture
def clean_machine():
    assert leftovers() == [], "the machine is not clean before the teardown test"
    yield
    netplane("lab", "down", check=False)


def start_up(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "netplane", "lab", "up", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def read_until(proc: subprocess.Popen, marker: str, timeout: float = 30) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"`lab up` never printed {marker!r}: {''.join(lines)}")


def wait_for_pod_namespaces(timeout: float = 20) -> None:
    """Halfway through the last step: pods' sandboxes are being made."""
    lab.wait_until(lambda: any(n.startswith("np-pod-") for n in netns.list_named()), timeout,
                   "a pod namespace", interval=0.05)


@pytest.mark.parametrize("marker, args", [
    ("[2/5]", ()),                         # the underlay is there, the control plane starting
    ("[3/5]", ("--pod-network", "vxlan", "--proxy", "iptables")),  # daemons starting on the nodes
    ("[4/5]", ("--store", "etcd")),        # pods being created (then we wait for a pod namespace)
], ids=["underlay", "nodes-joining", "pods-starting"])
def test_down_after_kill_9_of_up_halfway_then_again(clean_machine, marker, args):
    proc = start_up(*args)
    try:
        read_until(proc, marker)
        if marker == "[4/5]":
            wait_for_pod_namespaces()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    pids = lab_processes()
    refused = netplane("lab", "up", check=False)
    assert refused.returncode == 1 and "`netplane lab down` first" in refused.stdout, refused.stdout
    down_leaves_nothing(pids)


def test_up_refuses_while_up_and_down_after_a_normal_up_twice(clean_machine):
    up = netplane("lab", "up", "--nodes", "2", check=False)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "[5/5]" in up.stdout and "lab is up in" in up.stdout
    again = netplane("lab", "up", check=False)
    assert again.returncode == 1 and "a lab is already up" in again.stdout, again.stdout
    status = netplane("lab", "status", check=False)
    assert status.returncode == 0 and "netplane-system/ingress" in status.stdout, status.stdout
    ingress_line = status.stdout.splitlines()[-1]
    assert "192.168.56.2" in ingress_line and ingress_line.split()[-1] in ("control-plane", "worker-1")
    shell = subprocess.run([sys.executable, "-m", "netplane", "lab", "shell", "worker-1"], capture_output=True,
                           text=True, input="ip -br addr show eth0\nexit\n", timeout=30)
    assert shell.returncode == 0 and "192.168.56.11/24" in shell.stdout, shell.stdout + shell.stderr
    pids = lab_processes()
    assert len(pids) >= 9, pids  # apiserver, controllers, scheduler, lb-controller, 2 x (agent, proxy, speaker)
    down_leaves_nothing(pids)
