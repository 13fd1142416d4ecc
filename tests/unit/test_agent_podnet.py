"""The pod sandbox's pure parts: names, resolv.conf, hosts, CNI network config, env and result."""
from __future__ import annotations

import json

import pytest

from netplane import podnet

POD = {"metadata": {"name": "echo-7d4f", "namespace": "shop", "uid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427"},
       "spec": {"nodeName": "worker-1"}}


def test_netns_name_is_marked_short_and_stable():
    ref = podnet.PodRef.from_pod(POD)
    assert ref.netns == podnet.netns_name("1b4e28ba-2fa1-11d2-883f-0016d3cca427")
    assert ref.netns.startswith("np-pod-") and len(ref.netns) == len("np-pod-") + 12
    assert podnet.netns_name("other") != ref.netns
    assert ref.dir_name == "shop_echo-7d4f_1b4e28ba-2fa1-11d2-883f-0016d3cca427"


def test_hostname_is_spec_hostname_or_pod_name():
    assert podnet.PodRef.from_pod(POD).hostname == "echo-7d4f"
    pod = {"metadata": {"name": "x", "uid": "u"}, "spec": {"hostname": "web-0", "subdomain": "web"}}
    ref = podnet.PodRef.from_pod(pod)
    assert (ref.hostname, ref.subdomain, ref.namespace) == ("web-0", "web", "default")


def test_resolv_conf_is_cluster_first():
    assert podnet.resolv_conf("shop", "10.96.0.10", "cluster.local") == (
        "search shop.svc.cluster.local svc.cluster.local cluster.local\n"
        "nameserver 10.96.0.10\n"
        "options ndots:5\n")


NODE_RESOLV = "# written by the host\nnameserver 192.168.56.1\nnameserver 192.168.56.2\nsearch lab.example\noptions edns0 timeout:2\n"


def dns_of(spec: dict) -> podnet.DnsSettings:
    return podnet.PodRef.from_pod({"metadata": {"name": "p", "uid": "u"}, "spec": spec}).dns


def test_resolv_conf_cluster_first_merges_dns_config():
    dns = dns_of({"dnsConfig": {"nameservers": ["10.96.0.10", "1.1.1.1"], "searches": ["corp.example"],
                                "options": [{"name": "ndots", "value": "2"}, {"name": "single-request"}]}})
    assert podnet.resolv_conf("shop", "10.96.0.10", "cluster.local", dns) == (
        "search shop.svc.cluster.local svc.cluster.local cluster.local corp.example\n"
        "nameserver 10.96.0.10\nnameserver 1.1.1.1\n"  # the duplicate cluster DNS dropped
        "options ndots:2 single-request\n")  # dnsConfig's ndots replaces the default 5


def test_resolv_conf_default_is_the_nodes_and_none_is_dns_config_alone():
    default = dns_of({"dnsPolicy": "Default", "dnsConfig": {"options": [{"name": "timeout", "value": 5}]}})
    assert podnet.resolv_conf("shop", "10.96.0.10", "cluster.local", default, NODE_RESOLV) == (
        "search lab.example\nnameserver 192.168.56.1\nnameserver 192.168.56.2\noptions edns0 timeout:5\n")
    none = dns_of({"dnsPolicy": "None", "dnsConfig": {"nameservers": ["9.9.9.9"]}})
    assert podnet.resolv_conf("shop", "10.96.0.10", "cluster.local", none, NODE_RESOLV) == "nameserver 9.9.9.9\n"


def test_resolv_conf_keeps_three_nameservers_as_the_resolver_reads():
    dns = dns_of({"dnsPolicy": "Default", "dnsConfig": {"nameservers": ["10.0.0.1", "10.0.0.2"]}})
    text = podnet.resolv_conf("shop", "10.96.0.10", "cluster.local", dns, NODE_RESOLV)
    assert [line.split()[1] for line in text.splitlines() if line.startswith("nameserver")] == [
        "192.168.56.1", "192.168.56.2", "10.0.0.1"]


def test_parse_resolv_conf_ignores_comments_and_the_last_search_wins():
    text = "; comment\ndomain a.example\nnameserver 10.0.0.1 # trailing\nsearch b.example c.example\noptions ndots:3\n"
    assert podnet.parse_resolv_conf(text) == (["10.0.0.1"], ["b.example", "c.example"], [("ndots", "3")])


def test_hosts_file_names_the_pod_on_its_ip():
    text = podnet.hosts_file(podnet.PodRef.from_pod(POD), "10.244.1.7", "cluster.local")
    assert "127.0.0.1\tlocalhost\n" in text and text.endswith("10.244.1.7\techo-7d4f\n")
    sub = podnet.PodRef("shop", "web-0", "u", "web-0", "web")
    assert podnet.hosts_file(sub, "10.244.1.8", "cluster.local").endswith(
        "10.244.1.8\tweb-0.web.shop.svc.cluster.local\tweb-0\n")


def test_network_config_has_the_exact_shape():
    assert podnet.network_config("10.244.1.0/24", "/var/lib/np/worker-1") == {
        "cniVersion": "1.0.0", "name": "netplane", "type": "netplane-cni", "bridge": "cni0",
        "isGateway": True, "isDefaultGateway": True, "ipMasq": False, "hairpinMode": True, "mtu": 1500,
        "ipam": {"type": "netplane", "ranges": [[{"subnet": "10.244.1.0/24", "gateway": "10.244.1.1"}]],
                 "dataDir": "/var/lib/np/worker-1/ipam"}}


@pytest.mark.parametrize("cidr", ["10.244.1.5/24", "nonsense", "10.244.1.0/31"])
def test_bad_pod_cidr_is_named(cidr):
    with pytest.raises(ValueError, match="spec.podCIDR"):
        podnet.network_config(cidr, "/s")


def test_cni_env_as_a_runtime_sends_it():
    ref = podnet.PodRef.from_pod(POD)
    env = podnet.cni_env("ADD", ref, "/venv/bin", "/run/netns/" + ref.netns)
    assert env == {
        "CNI_COMMAND": "ADD", "CNI_CONTAINERID": ref.uid, "CNI_NETNS": "/run/netns/" + ref.netns,
        "CNI_IFNAME": "eth0", "CNI_PATH": "/venv/bin",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=echo-7d4f;"
                    f"K8S_POD_INFRA_CONTAINER_ID={ref.uid};K8S_POD_UID={ref.uid}"}
    assert "CNI_NETNS" not in podnet.cni_env("DEL", ref, "/venv/bin", None)


def test_pod_ip_from_result_prefers_the_sandbox_interface_and_ipv4():
    result = {"cniVersion": "1.0.0",
              "interfaces": [{"name": "cni0"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/run/netns/x"}],
              "ips": [{"address": "10.244.1.1/24", "interface": 0},
                      {"address": "fd00::7/64", "interface": 2},
                      {"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 2}]}
    assert podnet.pod_ip_from_result(result) == "10.244.1.7"
    assert podnet.pod_ip_from_result({"ips": [{"address": "10.0.0.5/24"}]}) == "10.0.0.5"
    with pytest.raises(podnet.CNIError, match="no IP"):
        podnet.pod_ip_from_result({"ips": []})


def test_error_from_output_reads_the_cni_error_json():
    out = json.dumps({"cniVersion": "1.0.0", "code": 7, "msg": "invalid network config", "details": "ipam"})
    assert podnet.error_from_output(1, out, "") == "code 7: invalid network config (ipam)"
    assert podnet.error_from_output(2, "", "Traceback...") == "exit code 2: Traceback..."


HOST_MOUNTINFO = """\
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
42 27 254:0 /run/netns /run/netns rw,relatime shared:1 - ext4 /dev/vda rw
43 42 0:4 net:[4026532177] /run/netns/np-a rw shared:2 - nsfs nsfs rw
"""
IP_NETNS_EXEC_MOUNTINFO = """\
48 47 254:0 / / rw,relatime - ext4 /dev/vda rw
68 48 254:0 /run/netns /run/netns rw,relatime master:1 - ext4 /dev/vda rw
69 68 0:4 net:[4026532177] /run/netns/np-a rw master:2 - nsfs nsfs rw
"""


def test_netns_mounts_propagate_unless_run_netns_is_a_slave_copy():
    assert podnet.netns_mounts_propagate(HOST_MOUNTINFO) is True
    assert podnet.netns_mounts_propagate(IP_NETNS_EXEC_MOUNTINFO) is False
    assert podnet.netns_mounts_propagate("27 1 254:0 / / rw shared:1 - ext4 /dev/vda rw\n") is True
