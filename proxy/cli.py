"""`netplane proxy render|sync|run`: the service proxy's command line.

  netplane proxy render --objects FILE [--backend nftables|iptables] [--node-ip IP]...
  netplane proxy sync --objects FILE --once [same flags]
  netplane proxy sync --cleanup [--backend B]
  netplane proxy run --server URL --node-name NAME --node-ip IP [--node-ip IP]...
                     [--cluster-cidr 10.244.0.0/16] [--health-listen ADDR]
"""
from __future__ import annotations

import argparse
import gc
import operator
import os
import pickle
import socket
import sys

import yaml

from netplane import objects
from netplane.proxy.model import (SERVICE_NAME_LABEL, Model, ModelError, NodeFacts, build_model, ip_family,
                                  object_key)

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


# ---------------------------------------------------------------------------------------------
# Reading a file of objects fast: a 10,000-Service x 10-endpoint file is 8 MB of YAML and must be
# read, rendered and programmed within 5 s. PyYAML's pure-Python loader takes 47 s for it; its C
# parser (CSafeLoader) 6 s, mostly in the cyclic garbage collector walking the million new
# objects, and in resolving every scalar's type by regular expressions. So: the C parser, the
# collector paused, scalar types resolved once per distinct (text, style), plain mappings and
# sequences built directly (anything else -- merge keys, timestamps -- by PyYAML's own code):
# 2 s. (Parsing the two halves of the file in two processes gained nothing measurable on this
# 2-CPU machine.) Same results and the same validation messages as netplane.objects.load_file.

_STR, _INT = "tag:yaml.org,2002:str", "tag:yaml.org,2002:int"
_MAP, _SEQ = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"


class FastLoader(yaml.CSafeLoader):
    # resolved tags of plain and of quoted scalars, by text; shared, read-mostly
    _plain_tags: dict[str, str] = {}
    _quoted_tags: dict[str, str] = {}
    # Path resolvers are never used by the safe loader, but the C composer calls these two for
    # every node: make them C builtins that do nothing (ignored results) instead of Python calls.
    descend_resolver = staticmethod(operator.is_)
    ascend_resolver = staticmethod(tuple)

    def resolve(self, kind, value, implicit):
        if kind is yaml.ScalarNode:
            tags = self._plain_tags if implicit[0] else self._quoted_tags
            tag = tags.get(value)
            if tag is None:
                tag = tags[value] = super().resolve(kind, value, implicit)
            return tag
        return _MAP if kind is yaml.MappingNode else _SEQ

    def construct_document(self, node):
        built = self._build(node)
        self.constructed_objects, self.recursive_objects = {}, {}
        return built

    def _build(self, node):
        tag = node.tag
        if tag == _STR:
            return node.value
        if tag == _MAP and all(k.tag == _STR for k, _ in node.value):
            return {k.value: self._build(v) for k, v in node.value}
        if tag == _SEQ:
            return [self._build(v) for v in node.value]
        if tag == _INT and node.value.isdigit():
            return int(node.value)
        return self.construct_object(node, deep=True)  # anything unusual: PyYAML's own way


PARALLEL_BYTES = 1 << 20  # below this, a second process costs more than it saves


def _parse(text: str) -> list:
    """The documents of `text`. A large file is parsed in two halves at once, the second in a
    forked child (2.3 s -> 1.5 s for 10,000 Services: parsing is most of a full sync, and one
    core is otherwise idle). Any failure is parsed again in one piece, so an error names the
    document and line exactly as it would have."""
    # the child gets a little less: it also pickles its half, and the parent unpickles it
    split = _document_start(text, len(text) * 11 // 20) if len(text) >= PARALLEL_BYTES else None
    if split is not None and (os.cpu_count() or 1) > 1:
        try:
            return _parse_in_two(text, split)
        except (yaml.YAMLError, ChildFailed):
            pass
    return list(yaml.load_all(text, Loader=FastLoader))


def _document_start(text: str, start: int) -> int | None:
    """The offset of the first `---` document marker line at or after `start`. YAML forbids such
    a line inside any content (c-forbidden), so the documents on each side parse on their own."""
    at = start
    while True:
        at = text.find("\n---", at)
        if at < 0:
            return None
        end = at + 4
        if end == len(text) or text[end] in " \t\r\n":
            return at + 1
        at = end


def _parse_in_two(text: str, split: int) -> list:
    first, second = in_two(lambda: list(yaml.load_all(text[:split], Loader=FastLoader)),
                           lambda: list(yaml.load_all(text[split:], Loader=FastLoader)))
    return first + second


def in_two(here, there):
    """(here(), there()), with there() run at the same time in a forked child and its result
    handed back pickled: for a short-lived command on a machine with a core to spare. Raises
    ChildFailed when the child did not deliver (here()'s own exceptions pass through)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the parent's code
        os.close(read_end)
        status = 1
        try:
            data = pickle.dumps(there(), pickle.HIGHEST_PROTOCOL)
            with os.fdopen(write_end, "wb") as out:
                out.write(data)
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    source = os.fdopen(read_end, "rb")
    try:
        mine = here()
        data = source.read()
    finally:
        source.close()  # before waiting: a child still writing gets EPIPE instead of blocking
        _, status = os.waitpid(pid, 0)
    if status != 0:
        raise ChildFailed(f"the forked child failed (status {status})")
    try:
        return mine, pickle.loads(data)
    except (EOFError, pickle.UnpicklingError) as err:
        raise ChildFailed(f"the forked child's result is unreadable: {err}") from None


class ChildFailed(OSError):
    pass


def load_objects(path: str) -> list[dict]:
    """Objects from a multi-document YAML (or JSON) file; `List` kinds flattened. Raises
    ManifestError naming the file and document, like netplane.objects.load_file."""
    try:
        with open(path) as source:
            text = source.read()
    except OSError as err:
        raise objects.ManifestError(f"{path}: cannot read: {err.strerror}") from None
    collecting = gc.isenabled()
    gc.disable()  # a million young objects that all live: collecting them is wasted time
    try:
        docs = _parse(text)
    except yaml.YAMLError as err:
        raise objects.ManifestError(f"{path}: YAML does not parse: {err}") from None
    finally:
        if collecting:
            gc.enable()
    return objects.objects_of(docs, path)


def model_from_file(path: str, node: NodeFacts) -> Model:
    objs = load_objects(path)
    return build_model(objects.by_kind(objs, "Service"), objects.by_kind(objs, "EndpointSlice"), node)


def render_text(model: Model, backend: str) -> str:
    if backend == "nftables":
        from netplane.proxy.nft import render_nft
        return render_nft(model)
    from netplane.proxy.iptables import render_iptables
    return render_iptables(model)


def _offline_inputs(args) -> tuple[list[dict], list[dict], NodeFacts] | None:
    """(Services, EndpointSlices, node facts) from --objects, or None after printing why not."""
    try:
        node = node_facts(args)
        objs = load_objects(args.objects)
    except (objects.ManifestError, ModelError) as err:
        print(f"netplane proxy: {err}", file=sys.stderr)
        return None
    return objects.by_kind(objs, "Service"), objects.by_kind(objs, "EndpointSlice"), node


def _refused(errors) -> bool:
    """Print the model's errors; True when there are any (nothing is programmed then)."""
    for error in errors:
        print(f"netplane proxy: {error}", file=sys.stderr)
    return bool(errors)


def _offline_model(args) -> Model | None:
    """The model from --objects, or None after printing why it cannot be used."""
    inputs = _offline_inputs(args)
    if inputs is None:
        return None
    model = build_model(*inputs)
    return None if _refused(model.errors) else model


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
    inputs = _offline_inputs(args)
    if inputs is None:
        return 1
    try:
        if args.backend == "nftables" and len(inputs[0]) >= PARALLEL_SERVICES and (os.cpu_count() or 1) > 1:
            result = _nft_sync_in_two(*inputs)
        else:
            result = _sync(args.backend, *inputs)
    except ApplyError as err:
        print(f"netplane proxy: {err}", file=sys.stderr)
        return 1
    if result is None:
        return 1
    print(f"programmed {result.services} service ports: {result.chains} chains, {result.rules} rules "
          f"({args.backend})", file=sys.stderr)
    return 0


def _sync(backend: str, services: list[dict], slices: list[dict], node: NodeFacts):
    """The full sync in this process; None after printing the model's errors."""
    from netplane.proxy.apply import backend_for
    model = build_model(services, slices, node)
    return None if _refused(model.errors) else backend_for(backend).sync(model, force_full=True)


PARALLEL_SERVICES = 2000  # from here on, converting and rendering in two processes saves time


def _nft_sync_in_two(services: list[dict], slices: list[dict], node: NodeFacts):
    """The full nftables sync of a large file, its Services converted and rendered in two halves at
    once (the second in a forked child): the same transaction text as one process renders, 0.3-0.4 s
    sooner at 10,000 Services. None after printing the model's errors (nothing is applied)."""
    from netplane.proxy import nft
    from netplane.proxy.apply import SyncResult, run_with_input

    services = sorted(services, key=object_key)
    first = {object_key(s) for s in services[:len(services) // 2]}

    def is_first(eps: dict) -> bool:
        meta = eps.get("metadata") or {}
        return ((meta.get("namespace") or "default"), (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)) in first

    def half(which: bool):
        model = build_model([s for s in services if (object_key(s) in first) == which],
                            [e for e in slices if is_first(e) == which], node)
        return len(model.ports), model.errors, [nft.services_part(nft.render_table(model, f)) for f in node.families]

    try:
        (ports_a, errors_a, parts_a), (ports_b, errors_b, parts_b) = in_two(lambda: half(True), lambda: half(False))
    except ChildFailed:
        return _sync("nftables", services, slices, node)  # in one process, then
    if _refused([*errors_a, *errors_b]):
        return None
    skeletons = [nft.render_table(build_model([], [], node), f) for f in node.families]
    parts = [[a, b] for a, b in zip(parts_a, parts_b)]  # per family: the first half's Services first
    text = "\n".join(nft.transaction_of_parts(t, p) for t, p in zip(skeletons, parts))
    run_with_input(["nft", "-f", "-"], text)
    counts = [nft.parts_counts(t, p) for t, p in zip(skeletons, parts)]
    return SyncResult(True, ports_a + ports_b, sum(c for c, _ in counts), sum(r for _, r in counts), len(text))


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
    if args.command in ("render", "sync"):
        # A short-lived run that builds a million objects which all live until it exits: the
        # cyclic collector would walk them again and again (3 s of 8 at 10,000 Services).
        gc.disable()
    return {"render": cmd_render, "sync": cmd_sync, "run": cmd_run}[args.command](args)
