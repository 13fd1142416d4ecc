"""`netplane proxy sync --cleanup` removes everything the proxy owns and nothing else.

In a fresh namespace, someone else's rules are planted first: nft tables of their own, and
iptables chains and rules (nft-based and legacy, IPv4 and IPv6), some with names or comments
close to ours. Then our rules are programmed with every backend, dual-stack, and cleaned up:
ours must be gone, theirs exactly as they were."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from netplane import netns
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.netns]

FOREIGN_NFT = """
table ip other {
    set blocked { type ipv4_addr ; elements = { 192.0.2.66 } ; }
    chain input {
        type filter hook input priority 0 ; policy accept ;
        ip saddr @blocked drop
        tcp dport 22 counter accept
    }
    chain helper { ip daddr 198.51.100.1 return ; }
}
table inet fw {
    chain forward { type filter hook forward priority 10 ; policy accept ; ct state invalid drop ; }
}
"""

# (tool, rules) in iptables syntax; run one by one. Names and comments close to ours on purpose.
FOREIGN_IPTABLES = {
    "iptables": [
        "-N FOREIGN", "-A FOREIGN -s 10.9.0.0/16 -j ACCEPT", "-A INPUT -j FOREIGN",
        "-N NPX-LOOKALIKE", "-A FORWARD -j NPX-LOOKALIKE",
        "-A INPUT -p tcp --dport 22 -m comment --comment \"netplane lab ssh\" -j ACCEPT",
        "-A OUTPUT -d 192.0.2.1/32 -j DROP",
        "-t nat -N FOREIGN-NAT", "-t nat -A FOREIGN-NAT -d 192.0.2.2/32 -j RETURN",
        "-t nat -A PREROUTING -j FOREIGN-NAT", "-t nat -A POSTROUTING -s 10.9.0.0/16 -j MASQUERADE",
    ],
    "ip6tables": [
        "-N FOREIGN6", "-A FOREIGN6 -s fd00:9::/64 -j ACCEPT", "-A INPUT -j FOREIGN6",
        "-t nat -A POSTROUTING -s fd00:9::/64 -j MASQUERADE",
    ],
}
VARIANTS = ("nft", "legacy")  # iptables-nft and iptables-legacy keep separate rules

OBJECTS = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.50
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: web6, namespace: default}
spec:
  clusterIP: fd00:96::50
  ipFamilies: [IPv6]
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: 10.96.0.51
  ports: [{name: dns, port: 53, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.10], nodeName: node-a}, {addresses: [10.244.1.11], nodeName: node-a}]
ports: [{name: http, port: 8080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web6-1, namespace: default, labels: {kubernetes.io/service-name: web6}}
addressType: IPv6
endpoints: [{addresses: ["fd00:244::10"], nodeName: node-a}]
ports: [{name: http, port: 8080, protocol: TCP}]
"""


def save_tool(family: str, variant: str) -> str:
    return f"{family}-{variant}-save"


def iptables_lines(ns: str) -> dict[str, list[str]]:
    """Per save tool: its tables, chain declarations (counters dropped) and rules, in order."""
    out = {}
    for family in FOREIGN_IPTABLES:
        for variant in VARIANTS:
            tool = save_tool(family, variant)
            text = netns.run([tool], netns=ns).stdout
            out[tool] = [line.split(" [")[0] if line.startswith(":") else line
                         for line in text.splitlines() if line and not line.startswith("#")]
    return out


BUILT_IN = {"INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"}


def without_built_in_chains(lines: list[str]) -> list[str]:
    """Built-in chain declarations left out: iptables-nft lists a built-in chain only once a
    rule has created it (an empty one with policy ACCEPT does nothing)."""
    return [line for line in lines if not (line.startswith(":") and line[1:].split()[0] in BUILT_IN)]


def theirs(lines: list[str]) -> list[str]:
    """What is not ours: all but our NP- chains, the rules in them and the jumps to them."""
    return [line for line in without_built_in_chains(lines)
            if not (line.startswith(":NP-") or line.startswith("-A NP-") or " -j NP-" in line)]


def nft_tables(ns: str) -> list[str]:
    return sorted(netns.run(["nft", "list", "tables"], netns=ns).stdout.splitlines())


def test_cleanup_removes_ours_and_leaves_theirs(make_netns, tmp_path: Path) -> None:
    ns = make_netns("pxcl")
    netns.run(["nft", "-f", "-"], netns=ns, input=FOREIGN_NFT)
    for family, rules in FOREIGN_IPTABLES.items():
        for variant in VARIANTS:
            for rule in rules:
                netns.run([f"{family}-{variant}", "-w", "5", *_split(rule)], netns=ns)
    their_nft = {t: netns.run(["nft", "list", "table", *t.split()[1:]], netns=ns).stdout
                 for t in ("table ip other", "table inet fw")}
    their_tables = nft_tables(ns)
    their_iptables = iptables_lines(ns)
    assert all(their_iptables.values())  # the planting worked in every variant

    objects = tmp_path / "objects.yaml"
    objects.write_text(OBJECTS)
    for backend in ("nftables", "iptables-nft", "iptables-legacy"):
        netns.run([sys.executable, "-m", "netplane", "proxy", "sync", "--once", "--objects", str(objects),
                   "--backend", backend, "--node-name", "node-a", "--node-ip", "192.168.77.1",
                   "--cluster-cidr", "10.244.0.0/16", "--cluster-cidr", "fd00:244::/48"], netns=ns)
    tables = nft_tables(ns)
    assert "table ip netplane" in tables and "table ip6 netplane" in tables
    ours = iptables_lines(ns)
    for tool, lines in ours.items():
        assert any(line.startswith(":NP-") for line in lines), (tool, lines)
        assert any(" -j NP-" in line and not line.split()[1].startswith("NP-") for line in lines), tool
        assert theirs(lines) == theirs(their_iptables[tool]), tool  # programming kept theirs too

    proc = netns.run([sys.executable, "-m", "netplane", "proxy", "sync", "--cleanup"], netns=ns, check=False)
    assert proc.returncode == 0, proc.stderr

    # ours: gone, from every backend and family
    assert nft_tables(ns) == their_tables
    ruleset = netns.run(["nft", "list", "ruleset"], netns=ns).stdout
    assert "table ip netplane" not in ruleset and "table ip6 netplane" not in ruleset
    after = iptables_lines(ns)
    for tool, lines in after.items():
        assert not any("NP-" in line.replace("NPX-", "") for line in lines), (tool, lines)
        assert not any('comment "netplane ' in line and "lab ssh" not in line for line in lines), (tool, lines)
    # theirs: exactly as planted
    for table, listing in their_nft.items():
        assert netns.run(["nft", "list", "table", *table.split()[1:]], netns=ns).stdout == listing, table
    for tool, lines in after.items():
        assert without_built_in_chains(lines) == without_built_in_chains(their_iptables[tool]), tool

    # a second cleanup with nothing of ours left is fine and still touches nothing of theirs
    again = netns.run([sys.executable, "-m", "netplane", "proxy", "sync", "--cleanup"], netns=ns, check=False)
    assert again.returncode == 0, again.stderr
    assert iptables_lines(ns) == after and nft_tables(ns) == their_tables


def _split(rule: str) -> list[str]:
    import shlex
    return shlex.split(rule)
