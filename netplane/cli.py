"""`netplane COMMAND ...`: one entry point; each command lives in its component and is imported lazily
(a CLI call should not pay for importing every component)."""
from __future__ import annotations

import importlib
import sys

# command -> "module:function"; each function takes the remaining argv and returns an exit code.
COMMANDS = {
    "lab": ("netplane.lab:main", "bring a multi-node lab up or down, inspect it, run commands in it"),
    "apply": ("netplane.kubectl:apply_main", "create or update objects from a manifest file"),
    "delete": ("netplane.kubectl:delete_main", "delete the objects a manifest file names"),
    "get": ("netplane.kubectl:get_main", "list or show objects"),
    "apiserver": ("netplane.apiserver:main", "serve the Kubernetes API over the store"),
    "controller-manager": ("netplane.controllers:main", "run the controllers"),
    "scheduler": ("netplane.scheduler:main", "bind pods to nodes"),
    "node": ("netplane.node:main", "make this machine a node: node join (agent, proxy, lb speaker), node reset"),
    "agent": ("netplane.agent:main", "the node agent: pods on this node"),
    "lb": ("netplane.loadbalancer:main", "LoadBalancer addresses: lb controller (the pool), lb speaker (ARP)"),
    "proxy": ("netplane.proxy.cli:main", "the service proxy: render, sync, run"),
    "dns": ("netplane.dns.cli:main", "the cluster DNS server"),
    "ingress": ("netplane.ingress.cli:main", "the ingress HTTP proxy"),
    "store": ("netplane.storecmd:main", "back up and restore the store: snapshot FILE, restore FILE"),
    "echo": ("netplane.echo:main", "the netplane/echo image: an HTTP server that says who answered"),
}


def usage() -> str:
    lines = ["usage: netplane COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<20}{help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    entry = COMMANDS.get(argv[0])
    if entry is None:
        print(f"netplane: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func_name = entry[0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
