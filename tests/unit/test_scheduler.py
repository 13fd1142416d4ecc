"""The scheduler's choice: Ready, schedulable, tolerated, least loaded, ties by name."""
from netplane import scheduler as s


def node(name, ready=True, taints=None, unschedulable=False, labels=None):
    return {"metadata": {"name": name, "labels": labels or {}},
            "spec": {"taints": taints or [], "unschedulable": unschedulable},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def pod(name="p", node_name=None, tolerations=None, phase="Pending", selector=None):
    return {"metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": node_name, "tolerations": tolerations or [], "nodeSelector": selector or {}},
            "status": {"phase": phase}}


CP_TAINT = {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}


def test_least_loaded_ready_node_wins_ties_by_name():
    nodes = [node("b"), node("a"), node("c", ready=False)]
    assert s.choose_node(pod(), nodes, {}) == ("a", "")
    assert s.choose_node(pod(), nodes, {"a": 2, "b": 1}) == ("b", "")


def test_taints_need_a_toleration():
    nodes = [node("cp", taints=[CP_TAINT]), node("w", unschedulable=False)]
    load = {"w": 5}
    assert s.choose_node(pod(), nodes, load)[0] == "w"
    exists = [{"key": CP_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}]
    assert s.choose_node(pod(tolerations=exists), nodes, load)[0] == "cp"
    wrong_effect = [{"key": CP_TAINT["key"], "operator": "Exists", "effect": "NoExecute"}]
    assert s.choose_node(pod(tolerations=wrong_effect), nodes, load)[0] == "w"
    assert s.choose_node(pod(tolerations=[{"operator": "Exists"}]), nodes, load)[0] == "cp"
    equal = [{"key": "k", "operator": "Equal", "value": "v", "effect": "NoSchedule"}]
    assert s.tolerates({"key": "k", "value": "v", "effect": "NoSchedule"}, equal)
    assert not s.tolerates({"key": "k", "value": "x", "effect": "NoSchedule"}, equal)


def test_no_fitting_node_says_why():
    name, why = s.choose_node(pod(), [node("cp", taints=[CP_TAINT]), node("w", ready=False),
                                      node("u", unschedulable=True)], {})
    assert name is None
    assert why.startswith("0/3 nodes are available")
    assert "cp: untolerated taint node-role.kubernetes.io/control-plane" in why and "w: not Ready" in why


def test_node_selector_and_load_counting():
    nodes = [node("a", labels={"disk": "ssd"}), node("b")]
    assert s.choose_node(pod(selector={"disk": "ssd"}), nodes, {"a": 9})[0] == "a"
    pods = [pod("1", "a"), pod("2", "a"), pod("3", "b"), pod("4", "b", phase="Succeeded"), pod("5")]
    assert s.pods_per_node(pods) == {"a": 2, "b": 1}
    assert s.needs_scheduling(pod()) and not s.needs_scheduling(pod(node_name="a"))


def test_replicas_of_one_controller_are_spread_before_load_is_balanced():
    owned = lambda name, node_name=None: {**pod(name, node_name),
                                          "metadata": {"name": name, "namespace": "default",
                                                       "ownerReferences": [{"uid": "rs1", "controller": True}]}}
    pods = [owned("a", "w1"), pod("sys1", "w2"), pod("sys2", "w2")]
    siblings = s.siblings_per_node(owned("new"), pods)
    assert siblings == {"w1": 1}
    load = s.pods_per_node(pods)
    # w1 is less loaded, but already holds a replica: the new one goes to w2
    assert s.choose_node(owned("new"), [node("w1"), node("w2")], load, siblings)[0] == "w2"
    assert s.choose_node(pod("lone"), [node("w1"), node("w2")], load, s.siblings_per_node(pod("lone"), pods))[0] == "w1"
