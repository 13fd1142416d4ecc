"""The node agent's pure core: flags, the Node it registers, routes to other nodes, pod status."""
from __future__ import annotations

import pytest

from netplane import agent
from netplane.agent import ContainerRecord, SandboxState

CONFIG = agent.AgentConfig(server="http://192.168.56.10:6443", node_name="worker-1", node_ip="192.168.56.11",
                           state_dir="/var/lib/np/worker-1", cni_bin_dir="/venv/bin",
                           node_labels={"tier": "edge"},
                           taints=({"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"},))


# ---------------------------------------------------------------- flags

def test_parse_node_labels():
    assert agent.parse_node_labels("a=b, c=,node-role.kubernetes.io/control-plane=") == \
        {"a": "b", "c": "", "node-role.kubernetes.io/control-plane": ""}
    assert agent.parse_node_labels("") == {}
    with pytest.raises(agent.FlagError, match="--node-labels: 'oops'"):
        agent.parse_node_labels("a=b,oops")


def test_parse_taints():
    assert agent.parse_taints("dedicated=infra:NoSchedule,node-role.kubernetes.io/control-plane:NoSchedule") == [
        {"key": "dedicated", "value": "infra", "effect": "NoSchedule"},
        {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]
    assert agent.parse_taints("node-role.kubernetes.io/control-plane=:NoSchedule") == [
        {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]
    with pytest.raises(agent.FlagError, match="--register-with-taints: 'a=b:Sometimes'"):
        agent.parse_taints("a=b:Sometimes")
    with pytest.raises(agent.FlagError, match="no key"):
        agent.parse_taints("=v:NoSchedule")


def test_parse_args_defaults_and_errors(capsys):
    config = agent.parse_args(["--server", "http://x:6443", "--node-name", "n1", "--node-ip", "10.0.0.1",
                               "--state-dir", "/tmp/s", "--node-labels", "a=b"])
    assert config.cluster_dns == "10.96.0.10" and config.cluster_domain == "cluster.local"
    assert config.node_labels == {"a": "b"} and config.cni_config_path == "/tmp/s/cni/10-netplane.conf"
    with pytest.raises(SystemExit):
        agent.parse_args(["--server", "u", "--node-name", "n", "--node-ip", "not-an-ip", "--state-dir", "/s"])
    assert "not-an-ip" in capsys.readouterr().err


# ---------------------------------------------------------------- the Node

def test_node_manifest_has_hostname_label_extra_labels_and_taints():
    assert agent.node_manifest(CONFIG) == {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "worker-1", "labels": {"kubernetes.io/hostname": "worker-1",
                                                     "kubernetes.io/os": "linux", "tier": "edge"}},
        "spec": {"taints": [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]}}


def test_node_status_addresses_ready_and_info():
    status = agent.node_status(CONFIG, {"architecture": "amd64", "kernel": "6.1", "cpus": 2, "memory_ki": 1000},
                               heartbeat="2024-01-01T00:00:05Z", ready_since="2024-01-01T00:00:00Z")
    assert status["addresses"] == [{"type": "InternalIP", "address": "192.168.56.11"},
                                   {"type": "Hostname", "address": "worker-1"}]
    assert status["conditions"] == [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                     "message": "netplane agent is posting ready status",
                                     "lastHeartbeatTime": "2024-01-01T00:00:05Z",
                                     "lastTransitionTime": "2024-01-01T00:00:00Z"}]
    assert status["nodeInfo"]["kernelVersion"] == "6.1" and status["capacity"]["cpu"] == "2"


# ---------------------------------------------------------------- routes

def node(name, cidr=None, ip=None):
    obj = {"metadata": {"name": name}, "spec": {}, "status": {}}
    if cidr:
        obj["spec"]["podCIDR"] = cidr
    if ip:
        obj["status"]["addresses"] = [{"type": "Hostname", "address": name}, {"type": "InternalIP", "address": ip}]
    return obj


def test_desired_routes_are_other_nodes_cidrs_via_their_internal_ip():
    nodes = [node("worker-1", "10.244.1.0/24", "192.168.56.11"), node("control-plane", "10.244.0.0/24", "192.168.56.10"),
             node("worker-2", "10.244.2.0/24", "192.168.56.12"), node("new", None, "192.168.56.13"),
             node("no-ip", "10.244.4.0/24"), node("bad", "nonsense", "192.168.56.14"),
             node("clash", "10.244.1.0/24", "192.168.56.15")]
    assert agent.desired_routes(nodes, "worker-1") == {"10.244.0.0/24": "192.168.56.10",
                                                        "10.244.2.0/24": "192.168.56.12"}


def test_route_commands_replace_changed_and_delete_gone():
    desired = {"10.244.0.0/24": "192.168.56.10", "10.244.2.0/24": "192.168.56.12"}
    actual = {"10.244.0.0/24": "192.168.56.10", "10.244.2.0/24": "192.168.56.99", "10.244.3.0/24": "192.168.56.13"}
    assert agent.route_commands(desired, actual) == [
        ["ip", "route", "replace", "10.244.2.0/24", "via", "192.168.56.12", "proto", "78"],
        ["ip", "route", "del", "10.244.3.0/24", "proto", "78"]]
    assert agent.route_commands(desired, desired) == []


def test_parse_route_listing():
    text = ('[{"dst":"10.244.2.0/24","gateway":"192.168.56.12","dev":"eth0","protocol":"78","flags":[]},'
            '{"dst":"10.9.9.9","gateway":"192.168.56.13","dev":"eth0","flags":[]}]')
    assert agent.parse_route_listing(text) == {"10.244.2.0/24": "192.168.56.12", "10.9.9.9/32": "192.168.56.13"}
    assert agent.parse_route_listing("") == {}


# ---------------------------------------------------------------- pod status

def running(name="echo", ready=True):
    rec = ContainerRecord(name, "netplane/echo:v2")
    rec.set_running("2024-01-01T00:00:01Z")
    rec.ready = ready
    return rec


def test_pending_until_sandbox_and_every_container_has_started():
    assert agent.pod_phase(False, [ContainerRecord("a", "x")]) == "Pending"
    assert agent.pod_phase(True, [running(), ContainerRecord("b", "x")]) == "Pending"
    image = ContainerRecord("b", "nginx")
    image.set_waiting("ErrImagePull", "cannot run")
    assert agent.pod_phase(True, [running(), image]) == "Pending"
    assert agent.pod_phase(True, [running()]) == "Running"


def test_phase_of_stopped_containers():
    done, failed = ContainerRecord("a", "x"), ContainerRecord("b", "x")
    done.set_running("t0")
    done.set_terminated(0, "t1")
    failed.set_running("t0")
    failed.set_terminated(2, "t1")
    assert agent.pod_phase(True, [done]) == "Succeeded"
    assert agent.pod_phase(True, [done, failed]) == "Failed"
    failed.set_waiting("CrashLoopBackOff", "back-off 2s")
    assert agent.pod_phase(True, [done, failed]) == "Running"


def test_container_status_shapes():
    rec = running(ready=False)
    assert rec.status() == {"name": "echo", "image": "netplane/echo:v2", "imageID": "", "containerID": "",
                            "ready": False, "started": True, "restartCount": 0,
                            "state": {"running": {"startedAt": "2024-01-01T00:00:01Z"}}, "lastState": {}}
    rec.set_terminated(137, "2024-01-01T00:00:09Z")
    assert rec.status()["state"] == {"terminated": {"exitCode": 137, "reason": "Error",
                                                    "startedAt": "2024-01-01T00:00:01Z",
                                                    "finishedAt": "2024-01-01T00:00:09Z"}}
    rec.set_waiting("CrashLoopBackOff", "back-off 1s")
    rec.restart_count = 1
    status = rec.status()
    assert status["state"] == {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 1s"}}
    assert status["lastState"]["terminated"]["exitCode"] == 137 and status["restartCount"] == 1


def test_conditions_keep_their_transition_time_until_status_changes():
    first = agent.next_conditions({}, {"Ready": False, "PodScheduled": True}, "t1")
    assert first == {"Ready": ("False", "t1"), "PodScheduled": ("True", "t1")}
    second = agent.next_conditions(first, {"Ready": True, "PodScheduled": True}, "t2")
    assert second == {"Ready": ("True", "t2"), "PodScheduled": ("True", "t1")}


def test_pod_status_of_a_ready_pod():
    sandbox = SandboxState(ready=True, pod_ip="10.244.1.7")
    containers = [running()]
    conditions = agent.next_conditions({}, agent.wanted_conditions(sandbox, containers), "t1")
    status = agent.pod_status(sandbox, containers, "192.168.56.11", "t0", conditions)
    assert status["phase"] == "Running"
    assert status["podIP"] == "10.244.1.7" and status["podIPs"] == [{"ip": "10.244.1.7"}]
    assert status["hostIP"] == "192.168.56.11" and status["startTime"] == "t0"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "PodReadyToStartContainers": "True", "PodScheduled": "True", "Initialized": "True",
        "ContainersReady": "True", "Ready": "True"}
    assert status["containerStatuses"][0]["ready"] is True
    assert "message" not in status


def test_pod_status_not_ready_while_a_container_is_not_ready_or_sandbox_failed():
    sandbox = SandboxState(ready=True, pod_ip="10.244.1.7")
    assert agent.wanted_conditions(sandbox, [running(), running("b", ready=False)])["Ready"] is False
    failed = SandboxState(reason="FailedCreatePodSandBox", message="CNI ADD failed: code 7: bad config")
    status = agent.pod_status(failed, [ContainerRecord("a", "x")], "192.168.56.11", "t0", {})
    assert status["phase"] == "Pending" and "podIP" not in status
    assert status["reason"] == "FailedCreatePodSandBox" and "code 7" in status["message"]
    assert status["containerStatuses"][0]["state"] == {"waiting": {"reason": "ContainerCreating"}}


def test_pod_status_surfaces_image_errors():
    rec = ContainerRecord("web", "nginx")
    rec.set_waiting("ErrImagePull", "image 'nginx' cannot run here")
    status = agent.pod_status(SandboxState(ready=True, pod_ip="10.244.1.9"), [rec], "h", "t0", {})
    assert status["message"] == "container web: image 'nginx' cannot run here"
    assert status["containerStatuses"][0]["state"]["waiting"]["reason"] == "ErrImagePull"


def test_status_patch_nulls_removed_keys():
    old = {"phase": "Pending", "reason": "FailedCreatePodSandBox", "message": "x"}
    new = {"phase": "Running", "podIP": "10.244.1.7"}
    assert agent.status_patch(old, new) == {"phase": "Running", "podIP": "10.244.1.7", "reason": None, "message": None}
    assert agent.status_patch(None, new) == new


def test_pod_netns_name_matches_what_the_worker_uses():
    pod = {"metadata": {"name": "p", "namespace": "default", "uid": "abc"}}
    assert agent.pod_netns_name(pod) == agent.PodRef.from_pod(pod).netns


def test_orphaned_sandboxes(tmp_path):
    for uid in ("keep", "gone"):
        d = tmp_path / f"default_p-{uid}_{uid}"
        d.mkdir()
        (d / "sandbox.json").write_text(f'{{"uid": "{uid}", "namespace": "default", "name": "p-{uid}", '
                                        f'"netns": "np-pod-x"}}')
    (tmp_path / "junk").mkdir()
    orphans = agent.orphaned_sandboxes(tmp_path, {"keep"})
    assert [(ref.uid, ref.name, path.name) for ref, path in orphans] == [("gone", "p-gone", "default_p-gone_gone")]
