"""The lab's pure parts: topology, kubeconfig, and the marker that `lab down` removes by."""
import yaml

from netplane import lab
from netplane.client import server_from_kubeconfig


def test_three_nodes_one_control_plane_on_the_underlay():
    nodes = lab.lab_nodes(3)
    assert [(n.name, n.address, n.netns, n.host_link, n.control_plane) for n in nodes] == [
        ("control-plane", "192.168.56.10", "np-control-plane", "np-u0", True),
        ("worker-1", "192.168.56.11", "np-worker-1", "np-u1", False),
        ("worker-2", "192.168.56.12", "np-worker-2", "np-u2", False),
    ]
    assert lab.api_url(nodes) == "http://192.168.56.10:6443"


def test_kubeconfig_points_at_the_api_server(tmp_path):
    path = tmp_path / "kubeconfig"
    path.write_text(lab.kubeconfig_text("http://192.168.56.10:6443"))
    assert yaml.safe_load(path.read_text())["current-context"] == "netplane-lab"
    assert server_from_kubeconfig(str(path)) == "http://192.168.56.10:6443"


def test_down_only_touches_lab_names():
    for name in ("np-control-plane", "np-worker-1", "np-worker-12", "np-pod-0a1b2c", "np-br0", "np-u3"):
        assert lab.is_lab_name(name), name
    for name in ("np-t-1234", "np-cni-node", "eth0", "np-worker-", "np-u", "docker0", "np-br1"):
        assert not lab.is_lab_name(name), name


def test_system_ready_needs_every_node_ready_and_system_pods_ready():
    node = {"metadata": {"name": "n"}, "spec": {"podCIDR": "10.244.0.0/24"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    pod = {"metadata": {"name": "dns", "namespace": "kube-system"},
           "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    unready = {"metadata": {"name": "ing", "namespace": "netplane-system"}, "status": {}}
    ingress = {"metadata": {"name": "ingress", "namespace": "netplane-system"}, "spec": {"type": "LoadBalancer"},
               "status": {"loadBalancer": {"ingress": [{"ip": "192.168.56.200"}]}}}
    pods = [pod, {**pod, "metadata": {"name": "x", "namespace": "netplane-system"}}]
    assert lab.system_ready({"nodes": [node], "pods": pods, "services": [ingress]}, 1)
    assert not lab.system_ready({"nodes": [node], "pods": pods, "services": [{**ingress, "status": {}}]}, 1)
    assert not lab.system_ready({"nodes": [node], "pods": [pod, unready], "services": [ingress]}, 1)
    assert not lab.system_ready({"nodes": [node], "pods": [pod, pod], "services": [ingress]}, 2)
