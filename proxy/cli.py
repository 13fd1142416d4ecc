"""`netplane proxy render|sync|run`: the service proxy's command line.

  netplane proxy render --objects FILE [--backend nftables|iptables] [--node-ip IP]...
  netplane proxy sync --objects FILE --once [same flags]
  netplane proxy sync --cleanup [--backend B]
  netplane proxy run --server URL --node-name NAME --node-ip IP [--node-ip IP]...
                     [--cluster-cidr 10.244.0.0/16] [--health-listen ADDR]
"""
from __future__ import annotations

import argparse
import socket
import sys

from netplane import objects
from netplane.proxy.model import Model, ModelError, NodeFacts, build_model, ip_family

BACKENDS = ("nftables", "iptables", "iptables-legacy", "iptables-nft")


def _node_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="nftables",
                        help="nftables (default) or iptables (iptables-restore; -legacy/-nft pick the variant)")
    parser.add_argument("--node-ip", action="append", default=[], metavar="IP",
                        help="an address that accepts NodePort traffic (repeat); none: every local address")
    parser.add_argument("--node-name", default=None,
                        help="this node's name, for traffic policy Local (default: the hostname)")
    parser.add_argument("--cluster-cidr", action="append", default=[], metavar="CIDR",
                        help="pod CIDR of the cluster, one per IP family (default 10.244.0.0/16); "
                             "traffic from outside it to a Service is masqueraded")
    parser.add_argument("--service-cidr", action="append", default=[], metavar="CIDR",
                        help="Service CIDR (optional): traffic to unallocated ClusterIPs in it is dropped")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="netplane proxy", description="the service proxy (our kube-proxy)")
    sub = top.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="print the rules for a file of objects")
    render.add_argument("--objects", required=True, metavar="FILE")
    _node_flags(render)
    sync = sub.add_parser("sync", help="program the current network namespace")
    sync.add_argument("--objects", metavar="FILE")
    sync.add_argument("--once", action="store_true", help="program once and exit")
    sync.add_argument("--cleanup", action="store_true", help="remove everything the proxy owns here")
    _node_flags(sync)
    run = sub.add_parser("run", help="watch the API server and keep the rules in sync")
    run.add_argument("--server", required=True, metavar="URL")
    run.add_argument("--health-listen", default=None, metavar="ADDR",
                     help="serve /healthz and /metrics here (e.g. 0.0.0.0:10256)")
    run.add_argument("--min-sync-interval", type=float, default=0.1, metavar="SECONDS")
    run.add_argument("--conntrack-cleanup", choices=("on", "off"), default="on",
                     help="delete UDP conntrack entries to endpoints that went away")
    _node_flags(run)
    return top


def node_facts(args: argparse.Namespace) -> NodeFacts:
    for flag, values in (("--node-ip", args.node_ip), ("--cluster-cidr", args.cluster_cidr),
                         ("--service-cidr", args.service_cidr)):
        for value in values:
            try:
                ip_family(value)
            except ValueError:
                raise ModelError(f"{flag} {value!r}: not an IP address or CIDR") from None
    return NodeFacts(
        name=args.node_name or socket.gethostname(),
        node_ips=tuple(args.node_ip),
        cluster_cidrs=tuple(args.cluster_cidr) or ("10.244.0.0/16",),
        service_cidrs=tuple(args.service_cidr),
    )


def model_from_file(path: str, node: NodeFacts) -> Model:
    objs = objects.load_file(path)
    return build_model(objects.by_kind(objs, "Service"), objects.by_kind(objs, "EndpointSlice"), node)


def render_text(model: Model, backend: str) -> str:
    if backend == "nftables":
        from netplane.proxy.nft import render_nft
        return render_nft(model)
    from netplane.proxy.iptables import render_iptables
    return render_iptables(model)


def _offline_model(args) -> Model | None:
    """The model from --objects, or None after printing why it cannot be used."""
    try:
        model = model_from_file(args.objects, node_facts(args))
    except (objects.ManifestError, ModelError) as err:
        print(f"netplane proxy: {err}", file=sys.stderr)
        return None
    if model.errors:
        for error in model.errors:
            print(f"netplane proxy: {error}", file=sys.stderr)
        return None
    return model


def cmd_render(args) -> int:
    model = _offline_model(args)
    if model is None:
        return 1
    sys.stdout.write(render_text(model, args.backend))
    return 0


def cmd_sync(args) -> int:
    from netplane.proxy.apply import ApplyError, backend_for
    if args.cleanup:
        errors = 0
        # --cleanup removes what either backend owns, whichever one was used before.
        for name in ("nftables", "iptables-nft", "iptables-legacy"):
            try:
                backend_for(name).cleanup()
            except (ApplyError, FileNotFoundError) as err:
                print(f"netplane proxy: cleanup ({name}): {err}", file=sys.stderr)
                errors += 1
        return 1 if errors else 0
    if not args.objects or not args.once:
        print("netplane proxy sync: needs --objects FILE --once (or --cleanup); "
              "use `netplane proxy run` to follow an API server", file=sys.stderr)
        return 2
    model = _offline_model(args)
    if model is None:
        return 1
    try:
        result = backend_for(args.backend).sync(model, force_full=True)
    except ApplyError as err:
        print(f"netplane proxy: {err}", file=sys.stderr)
        return 1
    print(f"programmed {result.services} service ports: {result.chains} chains, {result.rules} rules "
          f"({args.backend})", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    from netplane.proxy.proxier import run_daemon
    try:
        node = node_facts(args)
    except ModelError as err:
        print(f"netplane proxy: {err}", file=sys.stderr)
        return 2
    return run_daemon(args, node)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    return {"render": cmd_render, "sync": cmd_sync, "run": cmd_run}[args.command](args)
