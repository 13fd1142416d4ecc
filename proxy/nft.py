"""nftables rules for the model: pure functions, text in the `nft -f` language.

The layout is kube-proxy's nftables mode (pkg/proxy/nftables/proxier.go), in our own table
`netplane` (one per IP family):

  nat-prerouting / nat-output  -> services: `daddr . l4proto . dport vmap @service-ips`,
                                  then NodePorts: `vmap @service-nodeports`
  service-HASH-ns/svc/tcp/port -> masquerade off-cluster clients, then
                                  `numgen random mod N vmap { 0 : goto endpoint-..., ... }`
  endpoint-HASH-...__ip/port   -> hairpin masquerade, `dnat to ip:port`
  external-HASH-...            -> NodePort / externalIP / LoadBalancer traffic (masquerade, or
                                  keep the client IP for externalTrafficPolicy Local)
  local-HASH-...               -> node-local endpoints only (traffic policy Local)
  filter-* base chains         -> REJECT Services without endpoints (no-endpoint-* maps),
                                  loadBalancerSourceRanges (firewall-ips), stray ClusterIP ports
  nat-postrouting              -> masquerade packets carrying mark 0x4000

`render_table(model, family)` gives a structured `Table` (chains, sets, map elements grouped by
Service port), which `full_transaction` turns into one atomic transaction that recreates the
table, and `delta_transaction` turns into the smaller transaction from a previous Table.
"""
from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field

from netplane.proxy.model import EndpointChoice, Endpoint, Model, ServicePort, choose_endpoints

TABLE = "netplane"
MASQ_MARK = "0x4000"
NAME_MAX = 240  # nft names may be 256 bytes; kube-proxy keeps its names under 240

# (name, type, hook, priority): filters run before DNAT (-100) so they see the Service address.
BASE_CHAINS = (
    ("filter-prerouting", "filter", "prerouting", -110),
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    ("filter-output-post-dnat", "filter", "output", -90),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
)
# (from base chain, rule): how the base chains reach our regular chains.
BASE_JUMPS = (
    ("filter-prerouting", "ct state new jump firewall-check"),
    ("filter-input", "ct state new jump nodeport-endpoints-check"),
    ("filter-input", "ct state new jump service-endpoints-check"),
    ("filter-forward", "ct state new jump service-endpoints-check"),
    ("filter-forward", "ct state new jump cluster-ips-check"),
    ("filter-output", "ct state new jump service-endpoints-check"),
    ("filter-output", "ct state new jump firewall-check"),
    ("filter-output-post-dnat", "ct state new jump cluster-ips-check"),
    ("nat-prerouting", "jump services"),
    ("nat-output", "jump services"),
    ("nat-postrouting", "jump masquerading"),
)


@dataclass(frozen=True)
class Family:
    """Spelling of one IP family in nft."""
    table_family: str  # "ip" | "ip6"
    addr_type: str  # "ipv4_addr" | "ipv6_addr"
    loopback: str

    @property
    def x(self) -> str:  # the address match keyword: "ip" / "ip6"
        return self.table_family


FAMILIES = {4: Family("ip", "ipv4_addr", "127.0.0.0/8"), 6: Family("ip6", "ipv6_addr", "::1")}


@dataclass
class Block:
    """Everything one part of the table contributes: a Service port, or the fixed skeleton."""
    title: str
    sets: dict[str, str] = field(default_factory=dict)  # name -> "{ type ... ; }" (sets and maps)
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> rules, in order
    elements: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    # (set or map, key) -> (value or "", comment or "")


@dataclass
class Table:
    family: Family
    skeleton: Block
    services: list[Block]

    @property
    def blocks(self) -> list[Block]:
        return [self.skeleton, *self.services]

    def chain_count(self) -> int:
        return sum(len(b.chains) for b in self.blocks)

    def rule_count(self) -> int:
        return sum(len(rules) for b in self.blocks for rules in b.chains.values())


# ---------------------------------------------------------------------------------------------
# Names (kube-proxy's scheme: a hash for uniqueness, then the readable name)


def _hash_and_truncate(name: str) -> str:
    digest = base64.b32encode(hashlib.sha256(name.encode()).digest()).decode()[:8]
    full = f"{digest}-{name}"
    return full if len(full) <= NAME_MAX else full[:NAME_MAX - 3] + "..."


def port_chain_base(port: ServicePort) -> str:
    return _hash_and_truncate(f"{port.namespace}/{port.name}/{port.protocol}/{port.port_name}")


def endpoint_chain_base(port: ServicePort, ep: Endpoint) -> str:
    ip = ep.ip.replace(":", ".")  # colons are not allowed in nft names
    return _hash_and_truncate(
        f"{port.namespace}/{port.name}/{port.protocol}/{port.port_name}__{ip}/{ep.port}")


def is_service_chain(name: str) -> bool:
    """Per-Service chains always contain a '/', the fixed ones never do."""
    return "/" in name


# ---------------------------------------------------------------------------------------------
# The fixed part of the table


def _skeleton(model: Model, fam: Family) -> Block:
    x, addr = fam.x, fam.addr_type
    node_ips = model.node.ips_of(4 if fam.x == "ip" else 6)
    block = Block("skeleton")
    block.sets = {
        "cluster-ips": f'{{ type {addr} ; comment "Active ClusterIPs" ; }}',
        "firewall-ips": f"{{ type {addr} . inet_proto . inet_service : verdict ; "
                        'comment "destinations that are subject to LoadBalancerSourceRanges" ; }',
        "no-endpoint-nodeports": "{ type inet_proto . inet_service : verdict ; "
                                 'comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }',
        "no-endpoint-services": f"{{ type {addr} . inet_proto . inet_service : verdict ; "
                                'comment "vmap to drop or reject packets to services with no endpoints" ; }',
        "service-ips": f"{{ type {addr} . inet_proto . inet_service : verdict ; "
                       'comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }',
        "service-nodeports": '{ type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }',
    }
    if node_ips:
        block.sets["nodeport-ips"] = f'{{ type {addr} ; comment "IPs that accept NodePort traffic" ; }}'
        nodeport_match = f"{x} daddr @nodeport-ips"
        for ip in node_ips:
            block.elements[("nodeport-ips", ip)] = ("", "")
    else:  # no addresses given: NodePorts on every local address, as kube-proxy's match-all
        nodeport_match = f"fib daddr type local {x} daddr != {fam.loopback}"
    for name, ctype, hook, prio in BASE_CHAINS:
        rules = tuple(rule for chain, rule in BASE_JUMPS if chain == name)
        block.chains[f"{name} {{ type {ctype} hook {hook} priority {prio} ; }}"] = rules
    cidrs = model.node.service_cidrs_of(4 if x == "ip" else 6)
    cluster_ips_check = [f'{x} daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"']
    if cidrs:
        cluster_ips_check.append(
            f'{x} daddr {{ {", ".join(cidrs)} }} drop comment "Drop traffic to unallocated ClusterIPs"')
    block.chains.update({
        "cluster-ips-check": tuple(cluster_ips_check),
        "firewall-check": (f"{x} daddr . meta l4proto . th dport vmap @firewall-ips",),
        "mark-for-masquerade": (f"mark set mark or {MASQ_MARK}",),
        "masquerading": (f"mark and {MASQ_MARK} == 0 return", f"mark set mark xor {MASQ_MARK}",
                         "masquerade fully-random"),
        "nodeport-endpoints-check": (f"{nodeport_match} meta l4proto . th dport vmap @no-endpoint-nodeports",),
        'reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }': ("reject",),
        "service-endpoints-check": (f"{x} daddr . meta l4proto . th dport vmap @no-endpoint-services",),
        "services": (f"{x} daddr . meta l4proto . th dport vmap @service-ips",
                     f"{nodeport_match} meta l4proto . th dport vmap @service-nodeports"),
    })
    return block


def chain_name(declaration: str) -> str:
    """'filter-input { type ... }' -> 'filter-input'."""
    return declaration.split(" ", 1)[0]


# ---------------------------------------------------------------------------------------------
# One Service port


@dataclass(frozen=True)
class _Names:
    cluster: str
    local: str
    external: str
    firewall: str


def _service_block(port: ServicePort, model: Model, fam: Family) -> Block:
    choice = choose_endpoints(port, model.node.name)
    base = port_chain_base(port)
    names = _Names(f"service-{base}", f"local-{base}", f"external-{base}", f"firewall-{base}")
    block = Block(port.display)
    uses_cluster = bool(choice.cluster) and port.uses_cluster_endpoints
    uses_local = bool(choice.local) and port.uses_local_endpoints
    has_internal = choice.has_any and not (port.internal_local and not choice.local)
    has_external = choice.has_any and not (port.external_local and not choice.local)
    internal_chain = names.local if port.internal_local else names.cluster
    external_policy_chain = names.local if port.external_local else names.cluster
    uses_external = choice.has_any and port.externally_accessible
    if not choice.has_any:
        internal_verdict = external_verdict = "goto reject-chain"
    else:
        internal_verdict = external_verdict = "drop"  # traffic policy Local, none on this node

    _add_dispatch_elements(block, port, fam, names, has_internal, has_external, uses_external,
                           internal_chain, internal_verdict, external_verdict)
    if uses_cluster:
        block.chains[names.cluster] = _policy_chain(port, model, fam, choice.cluster,
                                                    masq_off_cluster=not port.internal_local)
    if uses_local:
        block.chains[names.local] = _policy_chain(port, model, fam, choice.local,
                                                  masq_off_cluster=port.internal_local)
    if uses_external:
        block.chains[names.external] = _external_chain(port, model, fam, names, has_external,
                                                       external_policy_chain)
    if port.load_balancer_ips and port.source_ranges:
        block.chains[names.firewall] = (_firewall_rule(port, model, fam),)
    for ep in choice.reachable:
        epbase = endpoint_chain_base(port, ep)
        if port.affinity_timeout:
            block.sets[f"affinity-{epbase}"] = (f"{{ type {fam.addr_type} ; flags dynamic,timeout ; "
                                                f"timeout {port.affinity_timeout}s ; }}")
        block.chains[f"endpoint-{epbase}"] = _endpoint_chain(port, fam, ep, epbase)
    return block


def _add_dispatch_elements(block: Block, port: ServicePort, fam: Family, names: _Names,
                           has_internal: bool, has_external: bool, uses_external: bool,
                           internal_chain: str, internal_verdict: str, external_verdict: str) -> None:
    """Map elements that send a Service's addresses to its chains, or to REJECT/DROP."""
    proto, number, comment = port.protocol, port.port, port.display
    els = block.elements
    els[("cluster-ips", port.cluster_ip)] = ("", "")
    key = f"{port.cluster_ip} . {proto} . {number}"
    if has_internal:
        els[("service-ips", key)] = (f"goto {internal_chain}", "")
    else:
        els[("no-endpoint-services", key)] = (internal_verdict, comment)
    for ip in (*port.external_ips, *port.load_balancer_ips):
        key = f"{ip} . {proto} . {number}"
        if uses_external:
            els[("service-ips", key)] = (f"goto {names.external}", "")
        if not has_external:
            els[("no-endpoint-services", key)] = (external_verdict, comment)
    if port.source_ranges:
        for ip in port.load_balancer_ips:
            els[("firewall-ips", f"{ip} . {proto} . {number}")] = (f"goto {names.firewall}", "")
    if port.node_port:
        key = f"{proto} . {port.node_port}"
        if uses_external:
            els[("service-nodeports", key)] = (f"goto {names.external}", "")
        if not has_external:
            els[("no-endpoint-nodeports", key)] = (external_verdict, comment)


def _policy_chain(port: ServicePort, model: Model, fam: Family, endpoints: tuple[Endpoint, ...],
                  masq_off_cluster: bool) -> tuple[str, ...]:
    """service-* / local-*: masquerade clients from outside the cluster, then pick an endpoint."""
    rules = []
    cidr = model.node.cluster_cidr(4 if fam.x == "ip" else 6)
    if masq_off_cluster:
        # An off-cluster client (a node, or a router with a static route to the Service range)
        # would get replies straight from the pod: masquerade so they come back through us.
        head = f"{fam.x} daddr {port.cluster_ip} {port.protocol} dport {port.port}"
        rules.append(f"{head} {fam.x} saddr != {cidr} jump mark-for-masquerade" if cidr
                     else f"{head} jump mark-for-masquerade")
    if port.affinity_timeout:
        for ep in endpoints:
            base = endpoint_chain_base(port, ep)
            rules.append(f"{fam.x} saddr @affinity-{base} goto endpoint-{base}")
    choices = " , ".join(f"{i} : goto endpoint-{endpoint_chain_base(port, ep)}"
                         for i, ep in enumerate(endpoints))
    rules.append(f"numgen random mod {len(endpoints)} vmap {{ {choices} }}")
    return tuple(rules)


def _external_chain(port: ServicePort, model: Model, fam: Family, names: _Names,
                    has_external: bool, policy_chain: str) -> tuple[str, ...]:
    if not port.external_local:
        # Endpoints may be on other nodes: masquerade so replies come back through this node.
        rules = ["jump mark-for-masquerade"]
    else:
        cidr = model.node.cluster_cidr(4 if fam.x == "ip" else 6)
        rules = []
        if cidr:
            rules.append(f'{fam.x} saddr {cidr} goto {names.cluster} comment "short-circuit pod traffic"')
        rules += [
            'fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"',
            f'fib saddr type local goto {names.cluster} comment "short-circuit local traffic"',
        ]
    if has_external:
        rules.append(f"goto {policy_chain}")
    return tuple(rules)


def _firewall_rule(port: ServicePort, model: Model, fam: Family) -> str:
    import ipaddress
    sources = list(port.source_ranges)
    node_ips = model.node.ips_of(4 if fam.x == "ip" else 6)
    if node_ips and any(ipaddress.ip_address(node_ips[0]) in ipaddress.ip_network(c)
                        for c in port.source_ranges):
        sources += port.load_balancer_ips  # a node reaching its own LB IP loops back from that IP
    return f"{fam.x} saddr != {{ {', '.join(sources)} }} drop"


def _endpoint_chain(port: ServicePort, fam: Family, ep: Endpoint, base: str) -> tuple[str, ...]:
    rules = [f"{fam.x} saddr {ep.ip} jump mark-for-masquerade"]  # hairpin: a pod reaching itself
    if port.affinity_timeout:
        rules.append(f"update @affinity-{base} {{ {fam.x} saddr }}")
    rules.append(f"meta l4proto {port.protocol} dnat to {ep.hostport}")
    return tuple(rules)


# ---------------------------------------------------------------------------------------------
# Tables and transactions


def render_table(model: Model, family: int) -> Table:
    fam = FAMILIES[family]
    return Table(fam, _skeleton(model, fam),
                 [_service_block(p, model, fam) for p in model.ports_of(family)])


def render_tables(model: Model) -> list[Table]:
    return [render_table(model, f) for f in model.node.families]


def _element_line(prefix: str, name: str, key: str, value: str, comment: str) -> str:
    text = key
    if comment:
        text += f' comment "{comment}"'
    if value:
        text += f" : {value}"
    return f"add element {prefix} {name} {{ {text} }}"


def _is_map(spec: str) -> bool:
    return ": verdict" in spec


def _block_lines(prefix: str, block: Block, seen_elements: set) -> list[str]:
    lines = []
    for name, spec in block.sets.items():
        kind = "map" if _is_map(spec) else "set"
        lines.append(f"add {kind} {prefix} {name} {spec}")
    # every chain exists before any rule jumps to it
    lines.extend(f"add chain {prefix} {decl}" for decl in block.chains)
    for decl, rules in block.chains.items():
        name = chain_name(decl)
        lines.extend(f"add rule {prefix} {name} {rule}" for rule in rules)
    for (name, key), (value, comment) in block.elements.items():
        if (name, key) not in seen_elements:  # e.g. the ClusterIP shared by a Service's ports
            seen_elements.add((name, key))
            lines.append(_element_line(prefix, name, key, value, comment))
    return lines


def full_transaction(table: Table) -> str:
    """One atomic transaction that replaces our table with `table` (nothing else is touched)."""
    prefix = f"{table.family.table_family} {TABLE}"
    lines = [
        f"# netplane service proxy: table {prefix} (recreated atomically)",
        f"add table {prefix}",
        f"delete table {prefix}",
        f'add table {prefix} {{ comment "rules for the netplane service proxy" ; }}',
    ]
    seen: set = set()
    lines += _block_lines(prefix, table.skeleton, seen)
    for block in table.services:
        lines.append("")
        lines.append(f"# {block.title}")
        lines += _block_lines(prefix, block, seen)
    return "\n".join(lines) + "\n"


def render_nft(model: Model) -> str:
    """The whole ruleset for `model`: one transaction per IP family, joined into one text that
    `nft -f` applies atomically."""
    return "\n".join(full_transaction(t) for t in render_tables(model))


def cleanup_transaction(families=(4, 6)) -> str:
    """Delete our tables, and only ours; absent tables are fine (add-then-delete)."""
    lines = []
    for f in families:
        prefix = f"{FAMILIES[f].table_family} {TABLE}"
        lines += [f"add table {prefix}", f"delete table {prefix}"]
    return "\n".join(lines) + "\n"


def _service_parts(table: Table) -> tuple[dict, dict, dict]:
    """(chains name -> (declaration, rules), sets name -> spec, elements) over all Service blocks."""
    chains, sets, elements = {}, {}, {}
    for block in table.services:
        for decl, rules in block.chains.items():
            chains[chain_name(decl)] = (decl, rules)
        sets.update(block.sets)
        for key, value in block.elements.items():
            elements.setdefault(key, value)
    return chains, sets, elements


def delta_transaction(old: Table, new: Table) -> str | None:
    """The transaction that turns the applied `old` table into `new`, touching only what
    changed; None when the fixed part differs (then recreate the whole table)."""
    if old.skeleton != new.skeleton or old.family != new.family:
        return None
    prefix = f"{new.family.table_family} {TABLE}"
    old_chains, old_sets, old_elements = _service_parts(old)
    new_chains, new_sets, new_elements = _service_parts(new)
    added = [n for n in new_chains if n not in old_chains]
    changed = [n for n in new_chains if n in old_chains and old_chains[n] != new_chains[n]]
    removed = [n for n in old_chains if n not in new_chains]
    lines = [f"add {'map' if _is_map(spec) else 'set'} {prefix} {name} {spec}"
             for name, spec in new_sets.items() if old_sets.get(name) != spec]
    lines += [f"add chain {prefix} {new_chains[n][0]}" for n in added]
    lines += [f"flush chain {prefix} {n}" for n in changed]
    for n in (*added, *changed):
        lines += [f"add rule {prefix} {n} {rule}" for rule in new_chains[n][1]]
    for key, value in old_elements.items():
        if new_elements.get(key) != value:
            lines.append(f"delete element {prefix} {key[0]} {{ {key[1]} }}")
    for (name, key), (value, comment) in new_elements.items():
        if old_elements.get((name, key)) != (value, comment):
            lines.append(_element_line(prefix, name, key, value, comment))
    lines += [f"flush chain {prefix} {n}" for n in removed]
    lines += [f"delete chain {prefix} {n}" for n in removed]
    lines += [f"delete set {prefix} {name}" for name in old_sets if name not in new_sets]
    # an affinity set whose timeout changed was re-added above with a different spec: nft
    # refuses to change a set's properties, so such a change goes through a full sync.
    if any(name in old_sets and old_sets[name] != spec for name, spec in new_sets.items()):
        return None
    return "\n".join(lines) + "\n" if lines else ""
