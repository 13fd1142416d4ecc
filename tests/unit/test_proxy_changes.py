"""The proxy's O(changed) path: change trackers -> ModelBuilder.update -> TableBuilder ->
delta_transaction. After every step of a random run of changes, each stage must equal what the
whole computation from scratch gives: the model, the rendered table, and the delta's effect."""
from __future__ import annotations

import copy
import random

import pytest

from netplane.client import ChangeTracker, Informer, ListingTracker
from netplane.objects import key_of
from netplane.proxy import conntrack, nft
from netplane.proxy.model import Model, ModelBuilder, NodeFacts, build_model
from tests.unit.test_proxy import endpoint_slice, ep, service

NODE = NodeFacts(name="worker-1", node_ips=("192.168.56.11",), cluster_cidrs=("10.244.0.0/16",))
DUAL = NodeFacts(name="worker-1", node_ips=("192.168.56.11", "fd00::11"),
                 cluster_cidrs=("10.244.0.0/16", "fd00:244::/56"))


class Objects:
    """The current Services and EndpointSlices, and a tracker recording each change into it."""

    def __init__(self) -> None:
        self.current: dict[str, dict[tuple, dict]] = {"Service": {}, "EndpointSlice": {}}
        self.trackers = {kind: ChangeTracker({}) for kind in self.current}

    def put(self, obj: dict) -> None:
        self.current[obj["kind"]][key_of(obj)] = obj
        self.trackers[obj["kind"]].record(key_of(obj), obj)

    def delete(self, kind: str, key: tuple) -> None:
        if self.current[kind].pop(key, None) is not None:
            self.trackers[kind].record(key, None)

    def take(self) -> tuple[dict, dict]:
        return self.trackers["Service"].take(), self.trackers["EndpointSlice"].take()

    def lists(self) -> tuple[list, list]:
        return list(self.current["Service"].values()), list(self.current["EndpointSlice"].values())


def random_service(rng: random.Random, i: int) -> dict:
    kind = rng.choice(["ClusterIP", "ClusterIP", "NodePort", "LoadBalancer", "bad", "headless"])
    ports = [{"name": "http", "port": 80, "protocol": "TCP"}]
    if rng.random() < 0.3:
        ports.append({"name": "dns", "port": 53, "protocol": "UDP"})
    spec = {"clusterIP": f"10.96.0.{i + 10}", "type": "ClusterIP"}
    if kind in ("NodePort", "LoadBalancer"):
        spec["type"] = kind
        for n, port in enumerate(ports):
            port["nodePort"] = 30000 + i * 2 + n
        spec["externalTrafficPolicy"] = rng.choice(["Cluster", "Local"])
        spec["healthCheckNodePort"] = 32000 + i if spec["externalTrafficPolicy"] == "Local" else 0
    if kind == "bad":
        ports[0]["port"] = 70000
    if kind == "headless":
        spec["clusterIP"] = "None"
    if rng.random() < 0.2:
        spec["sessionAffinity"] = "ClientIP"
    svc = service(name=f"svc-{i}", ports=ports, **spec)
    if kind == "LoadBalancer":
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": f"192.168.57.{i + 1}"}]}}
    return svc


def random_slice(rng: random.Random, i: int, part: int) -> dict:
    count = rng.choice([0, 1, 2, 3, 3, 5])
    endpoints = [ep(f"10.244.{part}.{rng.randrange(1, 40)}", node=rng.choice(["worker-1", "worker-2"]),
                    ready=rng.random() < 0.85, serving=True, terminating=rng.random() < 0.1)
                 for _ in range(count)]
    eps = endpoint_slice(service_name=f"svc-{i}", name=f"svc-{i}-{part}", endpoints=endpoints,
                         ports=[{"name": "http", "port": 8080, "protocol": "TCP"},
                                {"name": "dns", "port": 53, "protocol": "UDP"}])
    if rng.random() < 0.05:
        eps["endpoints"].append({"addresses": ["not-an-ip"]})  # a bad slice, reported
    return eps


def random_step(rng: random.Random, objects: Objects, services: int) -> None:
    for _ in range(rng.choice([1, 1, 2, 5])):
        i = rng.randrange(services)
        what = rng.random()
        if what < 0.35:
            objects.put(random_slice(rng, i, rng.choice([1, 2])))
        elif what < 0.5:
            objects.delete("EndpointSlice", ("default", f"svc-{i}-{rng.choice([1, 2])}"))
        elif what < 0.8:
            objects.put(random_service(rng, i))
        elif what < 0.9:
            objects.delete("Service", ("default", f"svc-{i}"))
        else:  # a new version of an object, equal in value: no change to program
            known = objects.current["Service"].get(("default", f"svc-{i}"))
            if known is not None:
                objects.put(copy.deepcopy(known))


def table_view(table: nft.Table) -> tuple:
    return table.skeleton, dict(sorted(table.services.items())), table.shared_chains()


@pytest.mark.parametrize("node,seed", [(NODE, 1), (NODE, 2), (NODE, 3), (DUAL, 4)])
def test_each_stage_after_a_run_of_changes_equals_the_computation_from_scratch(node, seed):
    rng = random.Random(seed)
    services = 12
    objects = Objects()
    for i in range(services):
        objects.put(random_service(rng, i))
        objects.put(random_slice(rng, i, 1))
    builder, tables = ModelBuilder(node), nft.TableBuilder()
    model = builder.update(*objects.take())
    previous = [tables.render(model, f) for f in node.families]
    seen_changes = 0
    for _ in range(60):
        random_step(rng, objects, services)
        before = model
        model = builder.update(*objects.take())
        scratch = build_model(*objects.lists(), node)
        assert model.ports == scratch.ports
        assert sorted(model.errors) == sorted(scratch.errors)
        # `changes` names exactly the Services whose ports differ, with their ports before/after
        differ = {k for k in {p.service_key for p in (*before.ports, *model.ports)}
                  if [p for p in before.ports if p.service_key == k] != [p for p in model.ports if p.service_key == k]}
        assert set(model.changes) == differ
        for key, (old, new) in model.changes.items():
            assert (old, new) == (tuple(p for p in before.ports if p.service_key == key),
                                  tuple(p for p in model.ports if p.service_key == key))
        seen_changes += bool(model.changes)
        for n, family in enumerate(node.families):
            table = tables.render(model, family)
            fresh = nft.render_table(scratch, family)
            assert table_view(table) == table_view(fresh)
            assert table.changed is not None  # rendered from the changes, not by walking all
            fast = nft.delta_transaction(previous[n], table)
            slow = nft.delta_transaction(nft.render_table(before, family), fresh)
            assert (fast is None) == (slow is None)
            if fast is not None:
                assert sorted(fast.splitlines()) == sorted(slow.splitlines())
                assert table.element_refs() == fresh.element_refs()
                assert table.shared_refs() == fresh.shared_refs()
            previous[n] = table
    assert seen_changes > 30


def test_unchanged_services_keep_their_port_objects_and_blocks():
    objects = Objects()
    objects.put(service(name="a", clusterIP="10.96.0.10"))
    objects.put(service(name="b", clusterIP="10.96.0.11"))
    objects.put(endpoint_slice(service_name="a", endpoints=[ep("10.244.1.1")]))
    builder, tables = ModelBuilder(NODE), nft.TableBuilder()
    first = builder.update(*objects.take())
    table = tables.render(first, 4)
    objects.put(endpoint_slice(service_name="a", endpoints=[ep("10.244.1.2")]))
    second = builder.update(*objects.take())
    assert set(second.changes) == {("default", "a")}
    assert second.ports[1] is first.ports[1]  # b: the very same object
    again = tables.render(second, 4)
    assert again.services[("default", "b", "tcp", "http")] is table.services[("default", "b", "tcp", "http")]
    assert again.changed == {("default", "a", "tcp", "http")}
    quiet = builder.update(*objects.take())  # nothing recorded: nothing changed
    assert quiet.changes == {} and quiet.ports == second.ports


def test_a_model_that_skips_a_generation_is_rendered_and_compared_whole():
    objects = Objects()
    objects.put(service(name="a"))
    objects.put(endpoint_slice(service_name="a", endpoints=[ep("10.244.1.9")]))
    builder, tables = ModelBuilder(NODE), nft.TableBuilder()
    first = tables.render(builder.update(*objects.take()), 4)
    objects.put(endpoint_slice(service_name="a", endpoints=[ep("10.244.1.1")]))
    builder.update(*objects.take())  # never rendered
    objects.put(service(name="b", clusterIP="10.96.0.51"))
    third = tables.render(builder.update(*objects.take()), 4)
    assert third.changed is None  # it does not follow the table rendered last
    assert table_view(third) == table_view(nft.render_table(build_model(*objects.lists(), NODE), 4))
    text = nft.delta_transaction(first, third)
    assert "10.244.1.1 . 8080" in text and "10.96.0.51 . tcp . 80" in text


def test_conntrack_is_cleaned_only_when_a_udp_port_changed():
    objects = Objects()
    dns = [{"name": "dns", "port": 53, "protocol": "UDP"}]
    objects.put(service(name="dns", ports=dns))
    objects.put(service(name="web", clusterIP="10.96.0.51"))
    builder = ModelBuilder(NODE)
    assert conntrack.udp_changed(builder.update(*objects.take()))
    objects.put(endpoint_slice(service_name="web", endpoints=[ep("10.244.1.1")]))
    assert not conntrack.udp_changed(builder.update(*objects.take()))
    objects.put(endpoint_slice(service_name="dns", endpoints=[ep("10.244.1.2")],
                               ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]))
    assert conntrack.udp_changed(builder.update(*objects.take()))
    assert conntrack.udp_changed(Model(NODE))  # no history: assume it did


# --- the trackers themselves ------------------------------------------------------------------

def test_informer_records_events_and_relists_into_its_trackers():
    import asyncio

    class Lister:
        def __init__(self, items):
            self.items = items

        async def list(self, *args):
            return {"items": self.items, "metadata": {"resourceVersion": "7"}}

    async def scenario():
        a, b = service(name="a"), service(name="b")
        client = Lister([a, b])
        informer = Informer(client, "Service")
        early = informer.tracker()  # made before the first list: gets it all from the list
        await informer._relist()
        assert early.take() == {("default", "a"): a, ("default", "b"): b}
        late = informer.tracker()  # made after: starts with everything in the cache
        assert late.take() == {("default", "a"): a, ("default", "b"): b}
        a2 = service(name="a", clusterIP="10.96.0.99")
        informer._apply("MODIFIED", a2)
        informer._apply("DELETED", b)
        assert early.take() == {("default", "a"): a2, ("default", "b"): None}
        assert early.take() == {}
        c = service(name="c")
        client.items = [a2, c]  # relist (after 410 Gone): b gone meanwhile, c new
        informer._apply("ADDED", b)
        await informer._relist()
        assert early.take() == {("default", "a"): a2, ("default", "b"): None, ("default", "c"): c}
        assert late.take() == {("default", "a"): a2, ("default", "b"): None, ("default", "c"): c}
    asyncio.run(scenario())


def test_listing_tracker_compares_listings_by_identity():
    class View:
        def __init__(self):
            self.objs = []

        def list(self, kind):
            return self.objs

    view = View()
    tracker = ListingTracker(view, "Service")
    a, b = service(name="a"), service(name="b")
    view.objs = [a, b]
    assert tracker.take() == {("default", "a"): a, ("default", "b"): b}
    assert tracker.take() == {}
    b2 = copy.deepcopy(b)
    view.objs = [b2]
    assert tracker.take() == {("default", "a"): None, ("default", "b"): b2}


@pytest.mark.parametrize("node,seed", [(NODE, 5), (DUAL, 6)])
def test_iptables_rulesets_from_the_builder_equal_rendering_from_scratch(node, seed):
    from netplane.proxy import iptables

    rng = random.Random(seed)
    objects = Objects()
    for i in range(12):
        objects.put(random_service(rng, i))
        objects.put(random_slice(rng, i, 1))
    builder, rulesets = ModelBuilder(node), iptables.RulesetBuilder()
    model = builder.update(*objects.take())
    previous = {f: rulesets.render(model, f) for f in node.families}
    reused = 0
    for _ in range(40):
        random_step(rng, objects, 12)
        model = builder.update(*objects.take())
        for family in node.families:
            got, want = rulesets.render(model, family), iptables.render_ruleset(model, family)
            assert got.tables == want.tables
            assert iptables.restore_text(got) == iptables.restore_text(want)
            assert iptables.delta_restore_text(previous[family], got) == \
                iptables.delta_restore_text(previous[family], want)
            reused += sum(rules is previous[family].tables["nat"].get(chain)
                          for chain, rules in got.tables["nat"].items() if iptables.is_service_chain(chain))
            previous[family] = got
    assert reused > 100  # unchanged Services kept their very rule lists


@pytest.mark.parametrize("node,seed", [(NODE, 8), (DUAL, 9)])
def test_a_transaction_from_two_halves_is_the_one_from_the_whole(node, seed):
    """What `proxy sync --once` builds in two processes for a large file (cli._nft_sync_in_two)."""
    rng = random.Random(seed)
    services = [random_service(rng, i) for i in range(16)]
    slices = [random_slice(rng, i, 1) for i in range(16)]
    slices.append(endpoint_slice(service_name="svc-9", name="svc-9-shared", endpoints=[ep("10.244.1.5", node="worker-1")]))
    slices.append(endpoint_slice(service_name="svc-2", name="svc-2-shared", endpoints=[ep("10.244.1.5", node="worker-1")]))
    whole = build_model(services, slices, node)
    ordered = sorted(services, key=lambda s: s["metadata"]["name"])
    first = {s["metadata"]["name"] for s in ordered[:8]}
    halves = [build_model([s for s in services if (s["metadata"]["name"] in first) == which],
                          [e for e in slices if (e["metadata"]["labels"]["kubernetes.io/service-name"] in first) == which],
                          node) for which in (True, False)]
    for family in node.families:
        assert halves[0].ports_of(family) + halves[1].ports_of(family) == whole.ports_of(family)
        table = nft.render_table(whole, family)
        skeleton = nft.render_table(build_model([], [], node), family)
        parts = [nft.services_part(nft.render_table(h, family)) for h in halves]
        assert nft.transaction_of_parts(skeleton, parts) == nft.full_transaction(table, readable=False)
        assert nft.parts_counts(skeleton, parts) == (table.chain_count(), table.rule_count())
