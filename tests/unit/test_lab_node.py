"""`netplane node join` (what a node runs, with which flags), the vxlan overlay's pure core, and the
lab's markers for `down`."""
import json
import shlex

import pytest

from netplane import lab, node, overlay
from netplane.node import JoinConfig


def argv_of(daemons, name):
    return next(d.argv for d in daemons if d.name == name)


def flag(argv, name):
    return argv[argv.index(name) + 1]


# ---------------------------------------------------------------- node join: the plan

def test_worker_runs_agent_proxy_and_speaker_pointed_at_the_server():
    config = JoinConfig("worker-1", "192.168.56.11", server="http://192.168.56.10:6443", python="py",
                        pod_network="vxlan", proxy="iptables", state_dir="/s")
    daemons = node.plan(config)
    assert [d.name for d in daemons] == ["agent-worker-1", "proxy-worker-1", "lb-speaker-worker-1"]
    agent = argv_of(daemons, "agent-worker-1")
    assert agent[:3] == ("py", "-m", "netplane") and agent[3] == "agent"
    assert flag(agent, "--pod-network") == "vxlan" and flag(agent, "--state-dir") == "/s/nodes/worker-1"
    assert flag(agent, "--cni-bin-dir") == "/s/cni-bin" and "--register-with-taints" not in agent
    proxy = argv_of(daemons, "proxy-worker-1")
    assert flag(proxy, "--backend") == "iptables" and flag(proxy, "--node-ip") == "192.168.56.11"
    speaker = argv_of(daemons, "lb-speaker-worker-1")
    assert speaker[3:5] == ("lb", "speaker")
    assert flag(speaker, "--agent-health-url") == "http://192.168.56.11:10248/healthz"
    for argv in (agent, proxy, speaker):
        assert flag(argv, "--server") == "http://192.168.56.10:6443"


def test_control_plane_starts_its_daemons_first_and_waits_for_the_api_server():
    config = JoinConfig("control-plane", "192.168.56.10", control_plane=True, python="py",
                        lb_pool=("192.168.56.200-192.168.56.210",), state_dir="/s")
    daemons = node.plan(config)
    assert [d.name for d in daemons] == ["apiserver", "controller-manager", "scheduler", "lb-controller",
                                         "agent-control-plane", "proxy-control-plane", "lb-speaker-control-plane"]
    apiserver = daemons[0]
    assert apiserver.ready_url == "http://192.168.56.10:6443/healthz"
    assert flag(apiserver.argv, "--store") == "sqlite" and flag(apiserver.argv, "--db") == "/s/store.db"
    assert flag(argv_of(daemons, "lb-controller"), "--pool") == "192.168.56.200-192.168.56.210"
    agent = argv_of(daemons, "agent-control-plane")
    assert flag(agent, "--register-with-taints") == node.CONTROL_PLANE_TAINT
    assert flag(agent, "--server") == "http://192.168.56.10:6443"  # its own API server


def test_etcd_store_runs_etcd_first_or_uses_given_endpoints():
    ours = node.plan(JoinConfig("cp", "10.0.0.10", control_plane=True, store="etcd", etcd_data_dir="/d"))
    assert ours[0].name == "etcd" and ours[0].ready_url == "http://127.0.0.1:2379/health"
    assert flag(ours[0].argv, "--data-dir") == "/d"
    assert flag(ours[1].argv, "--store") == "etcd" and flag(ours[1].argv, "--etcd-endpoints") == node.ETCD_CLIENT_URL
    theirs = node.plan(JoinConfig("cp", "10.0.0.10", control_plane=True, store="etcd",
                                  etcd_endpoints="http://10.0.0.5:2379"))
    assert theirs[0].name == "apiserver" and flag(theirs[0].argv, "--etcd-endpoints") == "http://10.0.0.5:2379"


@pytest.mark.parametrize("changes, fragment", [
    ({"node_ip": "300.1.1.1"}, "--node-ip"),
    ({"server": ""}, "--server is required"),
    ({"pod_network": "geneve"}, "--pod-network"),
    ({"proxy": "ipvs"}, "--proxy"),
    ({"cluster_cidr": "10.244.0.0/33"}, "--cluster-cidr"),
    ({"lb_pool": ("1.2.3.9-1.2.3.1",)}, "--pool"),
])
def test_bad_join_flags_are_named(changes, fragment):
    base = dict(node_name="w", node_ip="10.0.0.1", server="http://10.0.0.10:6443")
    with pytest.raises(ValueError, match=fragment):
        node.validate(JoinConfig(**{**base, **changes}))


def test_join_cli_dry_run_prints_the_plan(capsys):
    assert node.main(["join", "--server", "http://10.0.0.10:6443", "--node-name", "w1", "--node-ip", "10.0.0.11",
                      "--pod-network", "vxlan", "--proxy", "iptables", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["agent-w1", "proxy-w1", "lb-speaker-w1"]
    assert "--pod-network vxlan" in lines[0] and "--backend iptables" in lines[1]


def test_join_cli_refuses_bad_flags(capsys):
    with pytest.raises(SystemExit):
        node.main(["join", "--node-name", "w1", "--node-ip", "10.0.0.11"])
    assert "--server is required" in capsys.readouterr().err


def test_systemd_unit_runs_the_same_argv_and_restarts():
    daemon = node.Daemon("agent-w1", ("/opt/netplane/bin/python", "-m", "netplane", "agent", "--node-name", "w 1"))
    unit = node.systemd_unit(daemon)
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert shlex.split(exec_start[len("ExecStart="):]) == list(daemon.argv)
    assert "Restart=always" in unit and "WantedBy=multi-user.target" in unit
    assert node.unit_name(daemon) == "netplane-agent-w1.service"
    in_netns = node.systemd_unit(daemon, "np-worker-1")
    assert "ExecStart=nsenter --net=/run/netns/np-worker-1 -- /opt/netplane/bin/python" in in_netns


def test_lab_joins_each_node_with_the_same_code_path_and_its_options():
    options = lab.LabOptions(pod_network="vxlan", proxy="iptables", store="etcd")
    nodes = lab.lab_nodes(2)
    cp, worker = (lab.join_config(n, options, lab.api_url(nodes)) for n in nodes)
    assert cp.control_plane and cp.etcd_data_dir.endswith("/etcd") and cp.netns == "np-control-plane"
    assert not worker.control_plane and worker.etcd_data_dir == "" and worker.netns == "np-worker-1"
    assert [d.name for d in node.plan(worker)] == ["agent-worker-1", "proxy-worker-1", "lb-speaker-worker-1"]
    assert flag(argv_of(node.plan(worker), "agent-worker-1"), "--pod-network") == "vxlan"


def test_lab_refuses_too_many_nodes():
    with pytest.raises(ValueError, match="at most 100"):
        lab.lab_nodes(101)


# ---------------------------------------------------------------- lab down's markers

def test_mount_points_of_lab_namespaces_only():
    mountinfo = ("600 30 0:4 net:[4026532] /run/netns/np-worker-1 rw shared:5 - nsfs nsfs rw\n"
                 "601 30 0:4 net:[4026533] /run/netns/np-pod-0a1b2c3d4e5f rw shared:5 - nsfs nsfs rw\n"
                 "602 30 0:4 net:[4026534] /run/netns/np-t-123456 rw shared:5 - nsfs nsfs rw\n"
                 "603 30 0:4 net:[4026535] /run/netns/other rw shared:5 - nsfs nsfs rw\n"
                 "25 1 0:22 / /run rw,nosuid - tmpfs tmpfs rw\n")
    assert lab.netns_mount_points(mountinfo) == ["/run/netns/np-pod-0a1b2c3d4e5f", "/run/netns/np-worker-1"]


def test_environment_marker_is_this_lab_exactly():
    environ = b"PATH=/bin\0NETPLANE_LAB=/var/lib/netplane/lab\0HOME=/root\0"
    assert lab.has_marker(environ, "/var/lib/netplane/lab")
    assert not lab.has_marker(environ, "/var/lib/netplane/lab2")
    assert not lab.has_marker(b"NETPLANE_LAB=/var/lib/netplane/lab/x\0", "/var/lib/netplane/lab")


# ---------------------------------------------------------------- the vxlan overlay

def vnode(name, cidr, ip, mac=None):
    meta = {"name": name}
    if mac:
        meta["annotations"] = {overlay.MAC_ANNOTATION: mac}
    return {"metadata": meta, "spec": {"podCIDR": cidr} if cidr else {},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def test_vtep_mac_is_stable_unicast_and_locally_administered():
    mac = overlay.vtep_mac("192.168.56.11")
    assert mac == overlay.vtep_mac("192.168.56.11") != overlay.vtep_mac("192.168.56.12")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01
    assert overlay.node_annotations("192.168.56.11") == {overlay.MAC_ANNOTATION: mac,
                                                         overlay.NETWORK_ANNOTATION: "vxlan"}


def test_desired_overlay_entries_for_every_other_complete_node():
    nodes = [vnode("w1", "10.244.1.0/24", "192.168.56.11", "0e:00:00:00:00:01"),
             vnode("w2", "10.244.2.0/24", "192.168.56.12", "0E:00:00:00:00:02"),
             vnode("no-mac", "10.244.3.0/24", "192.168.56.13"),
             vnode("no-cidr", None, "192.168.56.14", "0e:00:00:00:00:04"),
             vnode("bad-ip", "10.244.5.0/24", "nope", "0e:00:00:00:00:05"),
             vnode("bad-mac", "10.244.6.0/24", "192.168.56.16", "zz:00:00:00:00:06")]
    state = overlay.desired_state(nodes, "w1")
    assert state == overlay.OverlayState(routes={"10.244.2.0/24": "10.244.2.0"},
                                         neighbours={"10.244.2.0": "0e:00:00:00:00:02"},
                                         fdb={"0e:00:00:00:00:02": "192.168.56.12"})


def test_overlay_commands_add_entries_before_routes_and_remove_stale_ones():
    desired = overlay.OverlayState({"10.244.2.0/24": "10.244.2.0"}, {"10.244.2.0": "0e:00:00:00:00:02"},
                                   {"0e:00:00:00:00:02": "192.168.56.12"})
    actual = overlay.OverlayState({"10.244.3.0/24": "10.244.3.0"}, {"10.244.3.0": "0e:00:00:00:00:03"},
                                  {"0e:00:00:00:00:03": "192.168.56.13"})
    assert overlay.commands(desired, actual) == [
        ["bridge", "fdb", "replace", "0e:00:00:00:00:02", "dev", "np-vxlan", "dst", "192.168.56.12", "self", "permanent"],
        ["ip", "neigh", "replace", "10.244.2.0", "lladdr", "0e:00:00:00:00:02", "dev", "np-vxlan", "nud", "permanent"],
        ["ip", "route", "replace", "10.244.2.0/24", "via", "10.244.2.0", "dev", "np-vxlan", "onlink", "proto", "78"],
        ["ip", "route", "del", "10.244.3.0/24", "proto", "78"],
        ["ip", "neigh", "del", "10.244.3.0", "dev", "np-vxlan"],
        ["bridge", "fdb", "del", "0e:00:00:00:00:03", "dev", "np-vxlan", "self"],
    ]
    assert overlay.commands(desired, desired) == []


def test_parse_actual_reads_ip_and_bridge_json():
    state = overlay.parse_actual(
        json.dumps([{"dst": "10.244.2.0/24", "gateway": "10.244.2.0", "dev": "np-vxlan", "flags": ["onlink"]}]),
        json.dumps([{"dst": "10.244.2.0", "lladdr": "0E:AA:BB:CC:DD:EE", "state": ["PERMANENT"]}]),
        json.dumps([{"mac": "0e:aa:bb:cc:dd:ee", "dst": "192.168.56.12", "flags": ["self"], "state": "permanent"},
                    {"mac": "33:33:00:00:00:01", "flags": ["self"], "state": "permanent"}]))
    assert state == overlay.OverlayState({"10.244.2.0/24": "10.244.2.0"}, {"10.244.2.0": "0e:aa:bb:cc:dd:ee"},
                                         {"0e:aa:bb:cc:dd:ee": "192.168.56.12"})


def test_device_matches_only_our_vxlan_for_this_node():
    link = {"address": overlay.vtep_mac("192.168.56.11"),
            "linkinfo": {"info_kind": "vxlan", "info_data": {"id": 1, "local": "192.168.56.11", "port": 8472}}}
    assert overlay.device_matches(link, "192.168.56.11")
    assert not overlay.device_matches(link, "192.168.56.12")
    assert not overlay.device_matches({**link, "linkinfo": {"info_data": {"id": 2, "local": "192.168.56.11",
                                                                          "port": 8472}}}, "192.168.56.11")


def test_agent_publishes_its_vtep_only_on_the_vxlan_pod_network():
    from netplane import agent
    base = dict(server="http://x", node_name="w1", node_ip="192.168.56.11", state_dir="/s", cni_bin_dir="/b")
    vxlan = agent.node_manifest(agent.AgentConfig(**base, pod_network="vxlan"))
    assert vxlan["metadata"]["annotations"] == overlay.node_annotations("192.168.56.11")
    assert "annotations" not in agent.node_manifest(agent.AgentConfig(**base))["metadata"]
    assert agent.parse_args(["--server", "http://x", "--node-name", "w1", "--node-ip", "192.168.56.11",
                             "--state-dir", "/s", "--pod-network", "vxlan"]).pod_network == "vxlan"


def test_reset_removes_only_the_pod_namespaces_of_its_own_nodes(tmp_path):
    from netplane.podnet import netns_name
    (tmp_path / "nodes" / "w1" / "pods" / "default_web-1_uid-1").mkdir(parents=True)
    (tmp_path / "nodes" / "w1" / "pods" / "kube-system_dns_uid-2").mkdir(parents=True)
    (tmp_path / "nodes" / "w1" / "cni").mkdir(parents=True)
    assert node.pod_namespaces(tmp_path) == sorted([netns_name("uid-1"), netns_name("uid-2")])
    assert node.pod_namespaces(tmp_path / "elsewhere") == []


def test_dns_upstream_sets_up_kube_dns_as_coredns_is():
    from netplane.node import JoinConfig, with_dns_upstream
    from netplane.objects import load_file

    objects = load_file(JoinConfig.system_manifest)
    assert with_dns_upstream(objects, "") is objects
    changed = with_dns_upstream(objects, "/etc/resolv.conf")
    (dns,) = [o for o in changed if o["kind"] == "Deployment" and o["metadata"]["name"] == "coredns"]
    spec = dns["spec"]["template"]["spec"]
    assert spec["dnsPolicy"] == "Default"
    assert spec["containers"][0]["args"][-2:] == ["--upstream", "/etc/resolv.conf"]
    assert "dnsPolicy" not in next(o for o in objects if o["metadata"]["name"] == "coredns")["spec"]["template"]["spec"]
