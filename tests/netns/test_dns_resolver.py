"""A pod's view of DNS: the glibc resolver in a network namespace whose resolv.conf (bind-mounted by
`ip netns exec` from /etc/netns/<ns>/, as the node agent does for pods) points at `netplane dns serve`
on port 53 there, with the pod search path and ndots:5. A short name and a name.namespace name
resolve through the search list; a name that exists nowhere does not."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from netplane import netns
from netplane.dns.testing import ServerProcess
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.netns]

OBJECTS = """
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec: {clusterIP: 10.96.0.50, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: other}
spec: {clusterIP: 10.96.0.60, ports: [{name: pg, port: 5432}]}
"""
RESOLV_CONF = """nameserver 127.0.0.1
search default.svc.cluster.local svc.cluster.local cluster.local
options ndots:5
"""


@pytest.fixture
def pod_netns(make_netns):
    name = make_netns("dns")
    etc = Path("/etc/netns") / name
    etc.mkdir(parents=True)
    try:
        (etc / "resolv.conf").write_text(RESOLV_CONF)
        yield name
    finally:
        shutil.rmtree(etc, ignore_errors=True)


def getent(ns: str, name: str) -> str:
    return netns.run(["getent", "hosts", name], netns=ns, check=False).stdout.strip()


def test_pod_search_path_resolves_short_and_namespaced_names(pod_netns, tmp_path):
    objects = tmp_path / "objects.yaml"
    objects.write_text(OBJECTS)
    with ServerProcess("--objects", str(objects), listen="127.0.0.1:53", health=False, netns=pod_netns):
        assert getent(pod_netns, "echo").split() == ["10.96.0.50", "echo.default.svc.cluster.local"]
        assert getent(pod_netns, "db.other").split() == ["10.96.0.60", "db.other.svc.cluster.local"]
        assert getent(pod_netns, "echo.default.svc.cluster.local").split()[0] == "10.96.0.50"
        assert getent(pod_netns, "nothing-here") == ""
