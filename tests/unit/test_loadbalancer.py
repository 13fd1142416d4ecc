"""LoadBalancer Services, pure parts: the pool, the allocator, ARP frames, membership, leader choice."""
import struct

import pytest

from netplane import announcer
from netplane.loadbalancer import Pool, PoolError, StatusChange, allocate


def svc(name, type_="LoadBalancer", ip=None, created="2025-01-01T00:00:00Z", ns="default", **spec):
    obj = {"metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
           "spec": {"type": type_, "ports": [{"port": 80}], **spec}}
    if ip:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip}]}}
    return obj


POOL = Pool.parse("192.168.56.200-192.168.56.202")


# ---------------------------------------------------------------- the pool

def test_pool_ranges_cidrs_and_single_addresses():
    pool = Pool.parse(["10.0.0.1-10.0.0.3, 10.0.1.0/30", "10.0.2.9"])
    assert [ip for ip in ("10.0.0.1", "10.0.0.3", "10.0.1.1", "10.0.1.2", "10.0.2.9") if ip in pool] == [
        "10.0.0.1", "10.0.0.3", "10.0.1.1", "10.0.1.2", "10.0.2.9"]
    for outside in ("10.0.0.4", "10.0.1.0", "10.0.1.3", "not-an-ip", "::1"):
        assert outside not in pool
    assert pool.first_free({"10.0.0.1", "10.0.0.2", "10.0.0.3"}) == "10.0.1.1"


@pytest.mark.parametrize("text, fragment", [
    ("10.0.0.5-10.0.0.1", "ends before it starts"),
    ("10.0.0.0/33", "--pool '10.0.0.0/33'"),
    ("10.0.0.1/24", "host bits"),
    ("banana", "want A-B"),
    ("", "no address range"),
])
def test_bad_pool_names_the_flag_and_value(text, fragment):
    with pytest.raises(PoolError, match=fragment.replace("(", r"\(")):
        Pool.parse(text)


# ---------------------------------------------------------------- allocation

def test_new_services_get_the_lowest_free_addresses_in_creation_order():
    changes = allocate([svc("b", created="2025-01-02T00:00:00Z"), svc("a", created="2025-01-01T00:00:00Z")], POOL)
    assert changes == [StatusChange("default", "a", "192.168.56.200", "allocated"),
                       StatusChange("default", "b", "192.168.56.201", "allocated")]
    assert changes[0].patch() == {"status": {"loadBalancer": {"ingress": [{"ip": "192.168.56.200", "ipMode": "VIP"}]}}}


def test_a_service_keeps_its_address_and_nothing_is_patched():
    assert allocate([svc("a", ip="192.168.56.201"), svc("b", ip="192.168.56.200")], POOL) == []


def test_a_pass_on_a_stale_view_neither_moves_nor_reuses_a_given_address():
    """`a` was given .200 but the view does not show it yet when an older Service `old` turns into a
    LoadBalancer: `a` keeps .200 and `old` gets .201 (without `given`, `old` would take .200 and `a`
    be moved)."""
    services = [svc("a", created="2025-01-02T00:00:00Z"), svc("old", created="2025-01-01T00:00:00Z")]
    assert allocate(services, POOL)[0] == StatusChange("default", "old", "192.168.56.200", "allocated")
    assert allocate(services, POOL, given={("default", "a"): "192.168.56.200"}) == [
        StatusChange("default", "old", "192.168.56.201", "allocated")]


def test_the_allocator_forgets_a_given_address_once_the_view_shows_it():
    import asyncio
    from netplane.loadbalancer import Allocator

    class View:
        services = [svc("a")]

        def is_synced(self):
            return True

        def list(self, kind):
            return list(self.services)

    class Client:
        def __init__(self):
            self.patches = []

        async def patch(self, kind, name, body, namespace=None, subresource=None):
            self.patches.append((name, [i["ip"] for i in body["status"]["loadBalancer"]["ingress"]]))

    view, client = View(), Client()
    allocator = Allocator(client, view, POOL)
    asyncio.run(allocator.sync())
    asyncio.run(allocator.sync())   # the view still shows no address: nothing new is patched
    assert client.patches == [("a", ["192.168.56.200"])]
    assert allocator.unseen(view.list("Service"), 0.0) == {("default", "a"): "192.168.56.200"}
    view.services = [svc("a", ip="192.168.56.200")]
    assert allocator.unseen(view.list("Service"), 0.0) == {}


def test_clash_the_older_service_keeps_the_address():
    older = svc("old", ip="192.168.56.200", created="2025-01-01T00:00:00Z")
    newer = svc("new", ip="192.168.56.200", created="2025-02-01T00:00:00Z")
    assert allocate([newer, older], POOL) == [StatusChange("default", "new", "192.168.56.201", "allocated")]


def test_address_outside_the_pool_is_replaced():
    assert allocate([svc("a", ip="10.1.1.1")], POOL) == [StatusChange("default", "a", "192.168.56.200", "allocated")]


def test_requested_address_is_given_when_free_and_refused_otherwise():
    changes = allocate([svc("a", loadBalancerIP="192.168.56.202"), svc("b", ip="192.168.56.200"),
                        svc("c", loadBalancerIP="192.168.56.200", created="2025-03-01T00:00:00Z"),
                        svc("d", loadBalancerIP="10.9.9.9")], POOL)
    assert changes[0] == StatusChange("default", "a", "192.168.56.202", "requested")
    assert [c.name for c in changes] == ["a"]  # c and d get nothing: taken / outside the pool


def test_exhausted_pool_leaves_the_service_pending():
    services = [svc(f"s{i}", created=f"2025-01-0{i + 1}T00:00:00Z") for i in range(4)]
    changes = allocate(services, POOL)
    assert [c.ip for c in changes] == ["192.168.56.200", "192.168.56.201", "192.168.56.202"]


def test_a_service_that_is_no_longer_a_load_balancer_gives_its_address_back():
    changes = allocate([svc("a", type_="NodePort", ip="192.168.56.200"), svc("b")], POOL)
    assert StatusChange("default", "a", None, "no longer a LoadBalancer") in changes
    assert changes[-1].patch() == {"status": {"loadBalancer": {"ingress": None}}}
    # another implementation's address (outside our pool) is not ours to take away
    assert allocate([svc("x", type_="NodePort", ip="10.1.1.1")], POOL) == []


def test_other_load_balancer_classes_are_left_alone():
    assert allocate([svc("a", loadBalancerClass="example.com/other")], POOL) == []
    assert allocate([svc("a", loadBalancerClass="netplane.io/lb")], POOL)[0].ip == "192.168.56.200"


# ---------------------------------------------------------------- ARP frames

MAC_HOST = bytes.fromhex("020000000001")
MAC_NODE = bytes.fromhex("0e0000000002")


def request(target_ip, sender_ip="192.168.56.1"):
    return announcer.arp_frame(announcer.BROADCAST, MAC_HOST,
                               announcer.Arp(announcer.ARP_REQUEST, MAC_HOST, sender_ip, b"\0" * 6, target_ip))


def test_arp_request_for_an_announced_address_gets_a_reply_to_the_asker():
    reply = announcer.answer(announcer.parse_arp(request("192.168.56.200")), MAC_NODE, {"192.168.56.200"})
    assert reply[:6] == MAC_HOST and reply[6:12] == MAC_NODE
    parsed = announcer.parse_arp(reply)
    assert parsed == announcer.Arp(announcer.ARP_REPLY, MAC_NODE, "192.168.56.200", MAC_HOST, "192.168.56.1")


def test_no_reply_for_other_addresses_replies_or_gratuitous_probes():
    assert announcer.answer(announcer.parse_arp(request("192.168.56.201")), MAC_NODE, {"192.168.56.200"}) is None
    garp = announcer.parse_arp(request("192.168.56.200", sender_ip="192.168.56.200"))
    assert announcer.answer(garp, MAC_NODE, {"192.168.56.200"}) is None
    reply = announcer.parse_arp(announcer.gratuitous(MAC_NODE, "192.168.56.200")[1])
    assert announcer.answer(reply, MAC_NODE, {"192.168.56.200"}) is None


def test_parse_arp_ignores_other_frames():
    assert announcer.parse_arp(b"\xff" * 12 + struct.pack("!H", 0x0800) + b"\0" * 40) is None
    assert announcer.parse_arp(request("1.2.3.4")[:30]) is None


def test_gratuitous_arp_announces_the_address_with_our_mac_to_everyone():
    frames = [announcer.parse_arp(f) for f in announcer.gratuitous(MAC_NODE, "192.168.56.200")]
    assert [f.op for f in frames] == [announcer.ARP_REQUEST, announcer.ARP_REPLY]
    for raw, f in zip(announcer.gratuitous(MAC_NODE, "192.168.56.200"), frames):
        assert raw[:6] == announcer.BROADCAST
        assert (f.sender_mac, f.sender_ip, f.target_ip) == (MAC_NODE, "192.168.56.200", "192.168.56.200")


# ---------------------------------------------------------------- membership and leaders

def test_heartbeat_round_trip_and_garbage():
    assert announcer.decode_heartbeat(announcer.encode_heartbeat("worker-1", True)) == ("worker-1", True)
    for junk in (b"", b"{", b"[]", b'{"node": 1, "healthy": true}', b'{"node": "a", "healthy": "yes"}'):
        assert announcer.decode_heartbeat(junk) is None


def test_membership_forgets_silent_or_unhealthy_peers():
    members = announcer.Membership(timeout=1.5)
    members.record("a", True, 10.0)
    members.record("b", True, 10.0)
    members.record("c", False, 11.0)
    assert members.alive(11.0) == {"a", "b"}
    members.record("a", True, 11.4)
    assert members.alive(12.0) == {"a"}


def node(name, ready=True, labels=None):
    return {"metadata": {"name": name, "labels": labels or {}},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "Unknown"}]}}


NODES = [node("control-plane"), node("worker-1"), node("worker-2")]
ALL = {"control-plane", "worker-1", "worker-2"}


def test_every_speaker_picks_the_same_leader_per_address_and_spreads_them():
    services = [svc(f"s{i}", ip=f"192.168.56.{200 + i}") for i in range(12)]
    chosen = announcer.leaders(services, NODES, [], ALL)
    assert len(chosen) == 12
    assert chosen == announcer.leaders(list(reversed(services)), list(reversed(NODES)), [], ALL)
    assert len(set(chosen.values())) == 3  # 12 addresses over 3 nodes: each node leads some


def test_leader_moves_when_it_fails_and_only_then():
    services = [svc(f"s{i}", ip=f"192.168.56.{200 + i}") for i in range(6)]
    before = announcer.leaders(services, NODES, [], ALL)
    failed = before["192.168.56.200"]
    after = announcer.leaders(services, NODES, [], ALL - {failed})
    assert after["192.168.56.200"] != failed
    assert all(after[ip] == leader for ip, leader in before.items() if leader != failed)  # no needless moves
    not_ready = [node(n["metadata"]["name"], ready=n["metadata"]["name"] != failed) for n in NODES]
    assert announcer.leaders(services, not_ready, [], ALL) == after


def test_no_candidate_no_leader_and_excluded_nodes_never_lead():
    services = [svc("a", ip="192.168.56.200"), svc("pending"), svc("c", type_="ClusterIP")]
    assert announcer.leaders(services, NODES, [], set()) == {}
    excluded = [node(n, labels={announcer.EXCLUDE_LABEL: ""}) for n in ("control-plane", "worker-1")]
    assert announcer.leaders(services, excluded + [node("worker-2")], [], ALL) == {"192.168.56.200": "worker-2"}


def test_traffic_policy_local_leads_from_a_node_with_a_ready_endpoint():
    local = svc("web", ip="192.168.56.200", externalTrafficPolicy="Local")
    slices = [{"metadata": {"namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
               "endpoints": [{"nodeName": "worker-2", "conditions": {"ready": True}},
                             {"nodeName": "worker-1", "conditions": {"ready": False}}]}]
    assert announcer.leaders([local], NODES, slices, ALL) == {"192.168.56.200": "worker-2"}
    assert announcer.leaders([local], NODES, [], ALL) == {}


def test_interface_with_address():
    listing = [{"ifname": "lo", "addr_info": [{"local": "127.0.0.1"}]},
               {"ifname": "eth1", "addr_info": [{"local": "192.168.56.11"}]}]
    assert announcer.interface_with_address(listing, "192.168.56.11") == "eth1"
    assert announcer.interface_with_address(listing, "10.0.0.1") is None


# ---------------------------------------------------------------- the speaker's takeover (a fake socket)

class FakeSocket:
    def __init__(self):
        self.sent = []

    def send(self, frame):
        self.sent.append(announcer.parse_arp(frame))


def test_speaker_takes_over_with_repeated_gratuitous_arp_and_lets_go(monkeypatch):
    from netplane.client import FileView
    clock = [1000.0]
    monkeypatch.setattr(announcer.time, "monotonic", lambda: clock[0])
    services = [svc("web", ip="192.168.56.200")]
    speaker = announcer.Speaker(announcer.SpeakerConfig("http://unused", "worker-1", "192.168.56.11"), client=None)
    speaker.view = FileView([*({**n, "kind": "Node", "apiVersion": "v1"} for n in NODES),
                             *({**s, "kind": "Service", "apiVersion": "v1"} for s in services)])
    speaker.sock, speaker.mac, speaker.self_healthy = FakeSocket(), MAC_NODE, True
    others = ALL - {"worker-1"}
    speaker.recompute()
    assert speaker.sock.sent == []  # too early: not announcing before the others could be heard
    clock[0] += announcer.MEMBER_TIMEOUT
    for name in others:
        speaker.membership.record(name, False, clock[0])  # the others' agents fail: we are the one left
    speaker.recompute()
    assert speaker.announced == {"192.168.56.200"}
    for step in (0.2, 0.5, 1.0, 2.0):
        clock[0] += step
        speaker.recompute()
    garps = [f for f in speaker.sock.sent if f.sender_ip == f.target_ip == "192.168.56.200"]
    assert len(garps) == 2 * len(announcer.GARP_REPEATS) and all(f.sender_mac == MAC_NODE for f in garps)
    speaker.self_healthy = False  # our agent stopped: we let go
    speaker.recompute()
    assert speaker.announced == set()
