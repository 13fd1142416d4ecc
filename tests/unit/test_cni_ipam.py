"""Built-in IPAM: round-robin choice (pure) and the host-local style directory."""
from __future__ import annotations

import os

import pytest

from netplane.cni import config, ipam, ipnet, spec

ip = ipnet.ip_address


def ipam_conf(*range_sets) -> config.IpamConf:
    return config.parse_ipam({"type": "netplane", "ranges": [list(rs) for rs in range_sets]})


def test_candidates_start_after_gateway_and_skip_it():
    (rs,) = ipam_conf([{"subnet": "10.0.0.0/29"}]).range_sets
    assert [str(a) for a in ipam.candidates(rs)] == [f"10.0.0.{i}" for i in range(2, 7)]


def test_candidates_resume_after_last_reserved_and_wrap():
    (rs,) = ipam_conf([{"subnet": "10.0.0.0/29"}]).range_sets
    assert [str(a) for a in ipam.candidates(rs, ip("10.0.0.4"))] == [
        "10.0.0.5", "10.0.0.6", "10.0.0.2", "10.0.0.3", "10.0.0.4"]


def test_candidates_span_several_ranges_of_a_set():
    (rs,) = ipam_conf([{"subnet": "10.0.0.0/30"}, {"subnet": "10.0.1.0/30"}]).range_sets
    assert [str(a) for a in ipam.candidates(rs, ip("10.0.0.2"))] == ["10.0.1.2", "10.0.0.2"]


def test_custom_gateway_in_the_middle_is_skipped():
    (rs,) = ipam_conf([{"subnet": "10.0.0.0/29", "gateway": "10.0.0.3"}]).range_sets
    assert "10.0.0.3" not in [str(a) for a in ipam.candidates(rs)]
    assert "10.0.0.1" in [str(a) for a in ipam.candidates(rs)]


def test_choose_is_round_robin_not_reusing_at_once():
    (rs,) = ipam_conf([{"subnet": "10.0.0.0/29"}]).range_sets
    # .2 was handed out last and released again: the next pod gets .3, not .2.
    assert ipam.choose(rs, taken=set(), last_reserved=ip("10.0.0.2")) == ip("10.0.0.3")


def test_choose_exhausted_names_the_range():
    (rs,) = ipam_conf([{"subnet": "10.0.0.0/30"}]).range_sets
    with pytest.raises(spec.CniError) as info:
        ipam.choose(rs, taken={ip("10.0.0.2")})
    assert info.value.code == spec.NO_FREE_ADDRESS
    assert info.value.msg == "no free address in 10.0.0.0/30"


def test_plan_gives_the_same_owner_the_same_addresses_and_one_per_range_set():
    conf = ipam_conf([{"subnet": "10.0.0.0/24"}], [{"subnet": "fd00::/64"}])
    owner = ipam.Owner("c1", "eth0")
    first = ipam.plan(conf, {}, {}, owner)
    assert [str(p.ip) for p in first] == ["10.0.0.2", "fd00::2"] and all(p.new for p in first)
    assert [p.cidr for p in first] == ["10.0.0.2/24", "fd00::2/64"]
    allocations = {p.ip: owner for p in first}
    again = ipam.plan(conf, allocations, {}, owner)
    assert [p.ip for p in again] == [p.ip for p in first] and not any(p.new for p in again)
    other = ipam.plan(conf, allocations, {}, ipam.Owner("c2", "eth0"))
    assert [str(p.ip) for p in other] == ["10.0.0.3", "fd00::3"]


def test_store_layout_is_host_locals(tmp_path):
    conf = ipam_conf([{"subnet": "10.0.0.0/24"}])
    store = ipam.Store(str(tmp_path), "net1")
    owner = ipam.Owner("c1", "eth0")
    with store.locked():
        (pick,) = ipam.plan(conf, store.allocations(), store.last_reserved(1), owner)
        store.reserve(pick, owner)
    directory = tmp_path / "net1"
    assert (directory / "10.0.0.2").read_bytes() == b"c1\r\neth0"
    assert (directory / "last_reserved_ip.0").read_text() == "10.0.0.2"
    assert (directory / "lock").exists()
    assert store.allocations() == {ip("10.0.0.2"): owner}
    assert store.last_reserved(1) == {0: ip("10.0.0.2")}
    with pytest.raises(spec.CniError):
        store.reserve(pick, ipam.Owner("c2", "eth0"))
    assert store.release_owner("c1", "eth1") == []
    assert store.release_owner("c1", "eth0") == [ip("10.0.0.2")]
    assert sorted(os.listdir(directory)) == ["last_reserved_ip.0", "lock"]
    assert store.release_owner("c1", "eth0") == []


def test_store_reads_files_with_whitespace_and_id_only(tmp_path):
    directory = tmp_path / "net1"
    directory.mkdir()
    (directory / "10.0.0.7").write_text("  c1  \n")
    (directory / "not-an-ip").write_text("x")
    store = ipam.Store(str(tmp_path), "net1")
    assert store.allocations() == {ip("10.0.0.7"): ipam.Owner("c1", "")}
    assert store.release_owner("c1", "eth0") == [ip("10.0.0.7")]


def test_last_reserved_is_rewritten_in_place_to_its_new_length(tmp_path):
    """Overwritten, then cut to length (not truncated to zero first): a shorter address leaves no tail."""
    conf = ipam_conf([{"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.9", "rangeEnd": "10.0.0.10"}])
    store = ipam.Store(str(tmp_path), "net1")
    last = tmp_path / "net1" / "last_reserved_ip.0"
    with store.locked():
        for container, expected in (("c1", "10.0.0.9"), ("c2", "10.0.0.10"), ("c3", "10.0.0.9")):
            owner = ipam.Owner(container, "eth0")
            (pick,) = ipam.plan(conf, store.allocations(), store.last_reserved(1), owner)
            store.reserve(pick, owner)
            assert last.read_text() == expected
            store.release_owner("c1", "eth0")
    assert store.last_reserved(1) == {0: ip("10.0.0.9")}
