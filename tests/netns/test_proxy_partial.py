"""A partial sync leaves exactly the rules a full sync would: apply a full sync, change the
objects, apply the partial sync, and compare the kernel's table with a fresh full sync of the
same objects in another namespace (chains, rules, sets and map elements, order aside)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from netplane import netns
from netplane.proxy.apply import NftBackend
from netplane.proxy.model import ModelBuilder, NodeFacts
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.netns]

NODE = NodeFacts("node-a", node_ips=("192.168.77.1",), cluster_cidrs=("10.244.0.0/16",))


def service(name, cluster_ip, ports, **spec):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": cluster_ip, "ports": ports, **spec}}


def endpoint_slice(service_name, ips, ports=(("http", 8080, "TCP"),), node="node-a"):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{service_name}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "endpoints": [{"addresses": [ip], "nodeName": node} for ip in ips],
            "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports]}


HTTP = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]


def before_objects():
    services = [
        service("web", "10.96.0.50", HTTP + [{"name": "dns", "port": 53, "protocol": "UDP"}]),
        service("api", "10.96.0.51", HTTP, type="NodePort", externalTrafficPolicy="Local",
                healthCheckNodePort=32000, externalIPs=["192.168.99.1"]),
        service("sticky", "10.96.0.52", HTTP, sessionAffinity="ClientIP"),
        service("gone", "10.96.0.53", HTTP),
        service("empty", "10.96.0.54", HTTP, type="NodePort"),
        service("trio", "10.96.0.56", HTTP),  # its pick chain is there when "web" gets 3 too
    ]
    slices = [
        endpoint_slice("web", ["10.244.1.10", "10.244.1.11"], ports=(("http", 8080, "TCP"), ("dns", 53, "UDP"))),
        endpoint_slice("api", ["10.244.1.10", "10.244.2.10"]),
        endpoint_slice("sticky", ["10.244.1.12", "10.244.1.13"]),
        endpoint_slice("gone", ["10.244.1.14"]),
        endpoint_slice("trio", ["10.244.3.1", "10.244.3.2", "10.244.3.3"], node="node-c"),
    ]
    return services, slices


def after_objects(services, slices):
    """Every kind of change at once: endpoints added and removed, a Service deleted, one added,
    one losing all its endpoints, one gaining them, affinity endpoints replaced."""
    services, slices = copy.deepcopy(services), copy.deepcopy(slices)
    services = [s for s in services if s["metadata"]["name"] != "gone"]
    services.append(service("new", "10.96.0.55", HTTP, type="NodePort"))
    slices = [s for s in slices if s["metadata"]["name"] != "gone-1"]
    slices[0]["endpoints"].append({"addresses": ["10.244.1.15"], "nodeName": "node-a"})  # web: 3
    slices[1]["endpoints"] = []  # api: none left
    slices[2]["endpoints"][1]["addresses"] = ["10.244.1.16"]  # sticky: one replaced
    slices += [endpoint_slice("new", ["10.244.1.17"]), endpoint_slice("empty", ["10.244.1.18"])]
    slices[-3]["endpoints"].pop()  # trio: 3 -> 2
    return services, slices


def table_contents(namespace: str) -> dict:
    """Our table as comparable data: chains -> rules, sets -> (type, flags, sorted elements)."""
    listing = json.loads(netns.run(["nft", "-j", "list", "table", "ip", "netplane"], netns=namespace).stdout)
    chains, rules, sets = {}, {}, {}
    for item in listing["nftables"]:
        kind, body = next(iter(item.items()))
        if kind == "chain":
            chains[body["name"]] = {k: v for k, v in body.items() if k not in ("handle",)}
            rules.setdefault(body["name"], [])
        elif kind == "rule":
            rules.setdefault(body["chain"], []).append(
                json.dumps({k: v for k, v in body.items() if k != "handle"}, sort_keys=True))
        elif kind in ("set", "map"):
            elements = sorted(json.dumps(e, sort_keys=True) for e in body.get("elem", []))
            sets[body["name"]] = ({k: v for k, v in body.items() if k not in ("handle", "elem")}, elements)
    return {"chains": chains, "rules": rules, "sets": sets}


def test_partial_sync_equals_a_fresh_full_sync(make_netns) -> None:
    services, slices = before_objects()
    incremental, fresh = make_netns("pxinc"), make_netns("pxnew")
    backend = NftBackend(incremental)
    builder = ModelBuilder(NODE)
    assert backend.sync(builder.build(services, slices)).full
    services, slices = after_objects(services, slices)
    after = builder.build(services, slices)
    assert not backend.sync(after).full
    NftBackend(fresh).sync(ModelBuilder(NODE).build(services, slices))
    got, want = table_contents(incremental), table_contents(fresh)
    assert got["chains"] == want["chains"]
    assert got["rules"] == want["rules"]
    assert got["sets"] == want["sets"]
    # and the change did something: the deleted Service's chains are gone
    assert not any("default/gone/" in name for name in got["chains"])


def test_a_run_of_partial_syncs_through_the_change_trackers_equals_fresh_full_syncs(make_netns) -> None:
    """The daemon's path: changes recorded by trackers, ModelBuilder.update, the in-process nft
    library for each partial transaction; after every step the kernel holds what a fresh full
    sync of the same objects gives."""
    import random

    from tests.unit.test_proxy_changes import Objects, random_service, random_slice, random_step

    rng = random.Random(7)
    objects = Objects()
    for i in range(10):
        objects.put(random_service(rng, i))
        objects.put(random_slice(rng, i, 1))
    incremental = make_netns("pxrun")
    backend, builder = NftBackend(incremental), ModelBuilder(NODE)
    assert backend.library is not None, "libnftables.so.1 (Debian libnftables1) is missing"
    assert backend.sync(builder.update(*objects.take())).full
    partial = 0
    for step in range(12):
        random_step(rng, objects, 10)
        partial += not backend.sync(builder.update(*objects.take())).full
        fresh = make_netns(f"pxref{step}")
        NftBackend(fresh).sync(ModelBuilder(NODE).build(*objects.lists()))
        assert table_contents(incremental) == table_contents(fresh), f"after step {step}"
        netns.delete(fresh)
    assert partial >= 6  # most steps were partial syncs


def _sync_once(namespace: str, path, parallel: bool) -> subprocess.CompletedProcess:
    """`netplane proxy sync --once` in `namespace`; `parallel` lowers the size from which the
    Services are converted and rendered in two processes, so that a small file takes that path."""
    code = ("import sys\nfrom netplane.proxy import cli\n"
            f"cli.PARALLEL_SERVICES = {2 if parallel else 10**9}\n"
            "sys.exit(cli.main(sys.argv[1:]))")
    return netns.run([sys.executable, "-c", code, "sync", "--once", "--objects", str(path),
                      "--node-ip", "192.168.77.1"], netns=namespace, check=False)


def test_sync_once_in_two_processes_programs_what_one_process_does(make_netns, tmp_path) -> None:
    import random

    import yaml

    from tests.unit.test_proxy_changes import random_service, random_slice

    rng = random.Random(11)
    objs = [o for i in range(12) for o in (random_service(rng, i), random_slice(rng, i, 1))]
    objs = [o for o in objs if "not-an-ip" not in json.dumps(o)]
    for o in objs:
        if o["kind"] == "Service" and o["spec"]["ports"][0]["port"] == 70000:
            o["spec"]["ports"][0]["port"] = 8080  # only good objects: both must program them
    path = tmp_path / "objects.yaml"
    path.write_text(yaml.safe_dump_all(objs))
    two, one = make_netns("pxtwo"), make_netns("pxone")
    a, b = _sync_once(two, path, parallel=True), _sync_once(one, path, parallel=False)
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert a.stderr == b.stderr and "programmed" in a.stderr  # the same counts
    assert table_contents(two) == table_contents(one)

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all([*objs, {**objs[0], "metadata": {"name": "zz-bad", "namespace": "default"},
                                               "spec": {**objs[0]["spec"], "ports": [{"port": 0}]}}]))
    fresh = make_netns("pxbad")
    refused = _sync_once(fresh, bad, parallel=True)
    assert refused.returncode == 1 and "Service default/zz-bad: field spec.ports[0].port" in refused.stderr
    assert netns.run(["nft", "list", "table", "ip", "netplane"], netns=fresh, check=False).returncode != 0
