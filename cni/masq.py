"""ipMasq: masquerade pod traffic that leaves the pod subnets, in an nft table we own outright.

One table per network, `inet netplane-cni-<network>`, so removing it (DEL of the network's last pod,
or GC) cannot touch anyone else's rules. The text is pure; applying it is one `nft -f -` that
replaces the table atomically, so applying twice is the same as once.
"""
from __future__ import annotations

from .proc import ProcError, run
from .spec import INTERNAL, CniError

TABLE_PREFIX = "netplane-cni-"


def table_name(network: str) -> str:
    return TABLE_PREFIX + network


def render(network: str, subnets: list) -> str:
    """The whole table for these pod subnets (ipnet.Network values)."""
    table = f"inet {table_name(network)}"
    rules = []
    for subnet in subnets:
        family, multicast = ("ip", "224.0.0.0/4") if subnet.version == 4 else ("ip6", "ff00::/8")
        rules.append(f"\t\t{family} saddr {subnet} {family} daddr != {subnet} "
                     f"{family} daddr != {multicast} masquerade")
    return "\n".join([
        f"table {table} {{}}",
        f"delete table {table}",
        f"table {table} {{",
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        *rules,
        "\t}",
        "}",
    ]) + "\n"


def apply(network: str, subnets: list) -> None:
    try:
        run(["nft", "-f", "-"], render(network, subnets))
    except ProcError as e:
        raise CniError(INTERNAL, f"cannot program masquerading: {e}")


def remove(network: str) -> None:
    """Delete the table; already gone is fine."""
    try:
        run(["nft", "delete", "table", "inet", table_name(network)])
    except ProcError as e:
        if "No such file or directory" not in e.stderr:
            raise CniError(INTERNAL, f"cannot remove masquerading: {e}")
