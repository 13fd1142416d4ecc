"""Stale UDP conntrack clean-up: a UDP client that keeps its source port keeps its conntrack
entry, and with it the endpoint it was DNATed to, even after that endpoint is gone (the DNS
client "talking to a dead pod", kube-proxy issues #19029, #48370, #105657, #139628).

Like kube-proxy's reconciler (pkg/proxy/conntrack/cleanup.go): after each sync, list the UDP
entries, and delete those sent to a Service address (ClusterIP, externalIP, LoadBalancer IP,
or a NodePort) whose reply comes from an address that is not a serving endpoint of that
Service port any more, including entries that were never DNATed because the Service had no
endpoints then. Pure: `stale_flows(model, flows)`; the shell lists and deletes with `conntrack`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from netplane import netns
from netplane.proxy.model import Model

_FIELD = re.compile(r"(src|dst|sport|dport)=(\S+)")


@dataclass(frozen=True)
class Flow:
    orig_src: str
    orig_dst: str
    orig_sport: int
    orig_dport: int
    reply_src: str


def parse_flows(listing: str) -> list[Flow]:
    """Flows from `conntrack -L -p udp` output (the first src/dst/sport/dport are the
    original direction, the next src is the reply's source)."""
    flows = []
    for line in listing.splitlines():
        fields = _FIELD.findall(line)
        if len(fields) < 5:
            continue
        values = [v for _, v in fields]
        try:
            flows.append(Flow(values[0], values[1], int(values[2]), int(values[3]), values[4]))
        except ValueError:
            continue
    return flows


def _udp_targets(model: Model) -> tuple[dict, dict]:
    """(address, port) -> serving endpoint IPs; node port -> serving endpoint IPs."""
    by_address: dict[tuple[str, int], set[str]] = {}
    by_node_port: dict[int, set[str]] = {}
    for port in model.ports:
        if port.protocol != "udp":
            continue
        serving = {e.ip for e in port.endpoints if e.serving}
        for address in (port.cluster_ip, *port.external_ips, *port.load_balancer_ips):
            by_address[(address, port.port)] = serving
        if port.node_port:
            by_node_port[port.node_port] = serving
    return by_address, by_node_port


def stale_flows(model: Model, flows: list[Flow]) -> list[Flow]:
    by_address, by_node_port = _udp_targets(model)
    node_ips = set(model.node.node_ips)
    stale = []
    for flow in flows:
        serving = by_address.get((flow.orig_dst, flow.orig_dport))
        if serving is None and flow.orig_dport in by_node_port and (
                not node_ips or flow.orig_dst in node_ips):
            serving = by_node_port[flow.orig_dport]
        if serving is not None and flow.reply_src not in serving:
            stale.append(flow)
    return stale


def list_udp_flows(namespace: str | None = None) -> list[Flow]:
    proc = netns.run(["conntrack", "-L", "-p", "udp"], netns=namespace, check=False)
    return parse_flows(proc.stdout)


def delete_flow(flow: Flow, namespace: str | None = None) -> bool:
    # Exit status 1 means "0 flow entries deleted": it expired meanwhile, which is fine.
    proc = netns.run(["conntrack", "-D", "-p", "udp", "--orig-src", flow.orig_src,
                      "--orig-dst", flow.orig_dst, "--sport", str(flow.orig_sport),
                      "--dport", str(flow.orig_dport)], netns=namespace, check=False)
    return proc.returncode == 0


def udp_changed(model: Model) -> bool:
    """Whether a UDP Service port changed since the model before (or that is unknown): only
    then can a flow have gone stale. A full sync (first, or after a failure) always cleans."""
    if model.changes is None:
        return True
    return any(p.protocol == "udp" for before, after in model.changes.values() for p in (*before, *after))


def clean_stale_udp(model: Model, namespace: str | None = None) -> int:
    """Delete stale UDP flows for `model`'s Services; returns how many were deleted."""
    if not any(p.protocol == "udp" for p in model.ports):
        return 0
    return sum(delete_flow(f, namespace) for f in stale_flows(model, list_udp_flows(namespace)))
