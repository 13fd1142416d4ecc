"""The controllers' pure functions: objects in, actions out."""
from netplane import controllers as c


def deployment(replicas=3, image="netplane/echo:v1", uid="d-uid"):
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "echo", "namespace": "default", "uid": uid, "generation": 1},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "echo"}},
                     "template": {"metadata": {"labels": {"app": "echo"}},
                                  "spec": {"containers": [{"name": "echo", "image": image,
                                                           "ports": [{"name": "http", "containerPort": 8080}]}]}}}}


def stored(obj, uid, **status):
    """What the API server returns: the object with a uid (and optional status)."""
    out = {**obj, "metadata": {**obj["metadata"], "uid": uid}}
    if status:
        out["status"] = status
    return out


def pod(name, ip=None, ready=True, node="worker-1", owner=None, labels=None, created="2026-01-01T00:00:00Z",
        ports=None):
    p = {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "creationTimestamp": created,
                      "labels": labels if labels is not None else {"app": "echo"},
                      "ownerReferences": [c.owner_reference(owner)] if owner else []},
         "spec": {"nodeName": node, "containers": [{"name": "echo", "image": "x",
                                                   "ports": ports if ports is not None else
                                                   [{"name": "http", "containerPort": 8080}]}]},
         "status": {"phase": "Running"}}
    if ip:
        p["status"]["podIP"] = ip
    p["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
    return p


def service(ports=None, selector=None, uid="s-uid"):
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "echo", "namespace": "default", "uid": uid},
            "spec": {"selector": selector if selector is not None else {"app": "echo"},
                     "ports": ports or [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}


def test_replicaset_name_is_a_stable_hash_of_the_template():
    a, b = c.replicaset_for(deployment()), c.replicaset_for(deployment())
    assert a["metadata"]["name"] == b["metadata"]["name"]
    assert a["metadata"]["name"].startswith("echo-")
    other = c.replicaset_for(deployment(image="netplane/echo:v2"))
    assert other["metadata"]["name"] != a["metadata"]["name"]
    template_hash = a["metadata"]["labels"]["pod-template-hash"]
    assert a["spec"]["selector"]["matchLabels"] == {"app": "echo", "pod-template-hash": template_hash}
    assert a["spec"]["template"]["metadata"]["labels"]["pod-template-hash"] == template_hash
    assert a["metadata"]["ownerReferences"][0]["uid"] == "d-uid"


def test_deployment_creates_then_scales_its_replicaset_and_zeroes_old_ones():
    d = deployment(replicas=3)
    [action] = [a for a in c.reconcile_deployment(d, []) if a.kind == "ReplicaSet"]
    assert action.verb == "create" and action.body["spec"]["replicas"] == 3
    current = stored(action.body, "rs-uid")
    assert [a for a in c.reconcile_deployment(d, [current]) if a.kind == "ReplicaSet"] == []
    scaled = c.reconcile_deployment(deployment(replicas=5), [current])
    assert [(a.verb, a.name, a.body) for a in scaled if a.kind == "ReplicaSet"] == [
        ("patch", current["metadata"]["name"], {"spec": {"replicas": 5}})]
    new_template = deployment(image="netplane/echo:v2")
    rollout = c.reconcile_deployment(new_template, [current])
    assert ("patch", current["metadata"]["name"], {"spec": {"replicas": 0}}) in [
        (a.verb, a.name, a.body) for a in rollout]
    assert any(a.verb == "create" and a.kind == "ReplicaSet" for a in rollout)


def test_replicaset_creates_missing_pods_and_deletes_extra_ones_in_kubernetes_order():
    rs = stored(c.replicaset_for(deployment(replicas=2)), "rs-uid")
    suffixes = iter("abcde")
    actions = c.reconcile_replicaset(rs, [], new_suffix=lambda: next(suffixes))
    created = [a.body for a in actions if a.verb == "create"]
    assert [p["metadata"]["name"] for p in created] == [f"{rs['metadata']['name']}-a", f"{rs['metadata']['name']}-b"]
    assert created[0]["metadata"]["ownerReferences"][0]["uid"] == "rs-uid"
    assert created[0]["metadata"]["labels"]["app"] == "echo"
    rs1 = {**rs, "spec": {**rs["spec"], "replicas": 1}}
    old_ready = pod("old", "10.0.0.1", owner=rs, created="2026-01-01T00:00:00Z")
    new_ready = pod("new", "10.0.0.2", owner=rs, created="2026-01-02T00:00:00Z")
    unready = pod("unready", "10.0.0.3", ready=False, owner=rs, created="2026-01-01T00:00:00Z")
    unscheduled = pod("pending", owner=rs, node=None)
    deletes = lambda pods: [a.name for a in c.reconcile_replicaset(rs1, pods) if a.verb == "delete"]
    assert deletes([old_ready, new_ready]) == ["new"]
    assert deletes([old_ready, unready]) == ["unready"]
    assert deletes([old_ready, unscheduled]) == ["pending"]
    assert deletes([pod("stranger", "10.0.0.9")]) == []  # not ours: ignored


def test_endpoint_slice_from_ready_and_unready_pods_with_named_target_port():
    svc = service()
    pods = [pod("a", "10.244.1.2"), pod("b", "10.244.2.2", ready=False, node="worker-2"),
            pod("c"),  # no IP yet: left out
            pod("d", "10.244.1.9", labels={"app": "other"})]
    [slice_] = c.endpoint_slices_for(svc, pods)
    assert slice_["metadata"]["labels"] == {c.SERVICE_NAME_LABEL: "echo", c.MANAGED_BY: c.SLICE_MANAGER}
    assert slice_["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    assert [(e["addresses"], e["conditions"]["ready"], e["nodeName"]) for e in slice_["endpoints"]] == [
        (["10.244.1.2"], True, "worker-1"), (["10.244.2.2"], False, "worker-2")]
    assert slice_["endpoints"][0]["targetRef"] == {"kind": "Pod", "namespace": "default", "name": "a",
                                                  "uid": "uid-a"}


def test_endpoint_slices_group_pods_by_resolved_ports_and_multiple_ports():
    svc = service(ports=[{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                         {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}])
    pods = [pod("a", "10.0.0.1"), pod("b", "10.0.0.2", ports=[{"name": "http", "containerPort": 9090}]),
            pod("c", "10.0.0.3", ports=[])]
    slices = c.endpoint_slices_for(svc, pods)
    by_ports = {tuple((p["name"], p["port"]) for p in s["ports"]): [e["addresses"][0] for e in s["endpoints"]]
                for s in slices}
    assert by_ports == {(("dns", 5353),): ["10.0.0.3"],
                        (("http", 8080), ("dns", 5353)): ["10.0.0.1"],
                        (("http", 9090), ("dns", 5353)): ["10.0.0.2"]}


def test_endpoint_slices_do_not_churn_and_follow_service_lifecycle():
    svc = service()
    pods = [pod("a", "10.244.1.2")]
    [create] = c.reconcile_endpoint_slices([svc], pods, [])
    assert create.verb == "create"
    existing = stored(create.body, "slice-uid")
    assert c.reconcile_endpoint_slices([svc], pods, [existing]) == []
    [update] = c.reconcile_endpoint_slices([svc], pods + [pod("b", "10.244.1.3")], [existing])
    assert update.verb == "patch" and len(update.body["endpoints"]) == 2
    assert [a.verb for a in c.reconcile_endpoint_slices([], pods, [existing])] == ["delete"]
    foreign = {**existing, "metadata": {**existing["metadata"], "labels": {c.SERVICE_NAME_LABEL: "kubernetes"}}}
    assert c.reconcile_endpoint_slices([], pods, [foreign]) == []
    assert c.endpoint_slices_for(service(selector={}), pods) == []


def test_empty_service_still_gets_an_empty_slice():
    [slice_] = c.endpoint_slices_for(service(), [])
    assert slice_["endpoints"] == [] and slice_["ports"] == []


def test_endpoints_list_ready_and_unready_pods_per_port_set_as_kubectl_get_endpoints_shows():
    svc = service(ports=[{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}])
    svc["metadata"]["labels"] = {"app": "echo"}
    pods = [pod("a", "10.244.1.2"), pod("b", "10.244.2.2", ready=False, node="worker-2"),
            pod("c", "10.244.1.3", ports=[{"name": "http", "containerPort": 9090}]), pod("d")]
    eps = c.endpoints_for(svc, pods)
    assert eps["metadata"]["labels"] == {"app": "echo", c.ENDPOINTS_MANAGED_BY: c.ENDPOINTS_MANAGER}
    assert [([a["ip"] for a in s.get("addresses", [])], [a["ip"] for a in s.get("notReadyAddresses", [])],
             s["ports"]) for s in eps["subsets"]] == [
        (["10.244.1.2"], ["10.244.2.2"], [{"name": "http", "port": 8080, "protocol": "TCP"}]),
        (["10.244.1.3"], [], [{"name": "http", "port": 9090, "protocol": "TCP"}])]
    assert eps["subsets"][0]["addresses"][0]["targetRef"]["name"] == "a"
    assert c.endpoints_for(service(selector={}), pods) is None            # its user's to write
    assert c.endpoints_for(service(), [])["subsets"] == []


def test_endpoints_follow_their_service_and_take_over_a_stale_copy():
    svc, pods = service(), [pod("a", "10.244.1.2")]
    [create] = c.reconcile_endpoints([svc], pods, [])
    assert (create.verb, create.kind, create.name) == ("create", "Endpoints", "echo")
    existing = stored(create.body, "ep-uid")
    assert c.reconcile_endpoints([svc], pods, [existing]) == []           # no churn
    [update] = c.reconcile_endpoints([svc], pods + [pod("b", "10.244.1.3")], [existing])
    assert update.verb == "patch" and len(update.body["subsets"][0]["addresses"]) == 2
    assert [a.verb for a in c.reconcile_endpoints([], pods, [existing])] == ["delete"]   # the Service is gone
    users = {**existing, "metadata": {"name": "echo", "namespace": "default"}}          # written by hand
    assert c.reconcile_endpoints([service(selector={})], pods, [users]) == []
    [taken] = c.reconcile_endpoints([svc], pods, [{**users, "subsets": []}])            # a selector: ours now
    assert taken.verb == "patch" and taken.body["metadata"]["labels"][c.ENDPOINTS_MANAGED_BY] == c.ENDPOINTS_MANAGER


def test_a_users_endpoints_for_a_service_without_selector_become_endpoint_slices():
    external = service(selector={}, ports=[{"name": "db", "port": 5432, "protocol": "TCP"}])
    eps = {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "echo", "namespace": "default"},
           "subsets": [{"addresses": [{"ip": "192.0.2.10"}, {"ip": "2001:db8::1"}],
                        "notReadyAddresses": [{"ip": "192.0.2.11"}],
                        "ports": [{"name": "db", "port": 5432, "protocol": "TCP"}]}]}
    slices = c.mirrored_slices([external], [eps])
    assert [(s["addressType"], [(e["addresses"][0], e["conditions"]["ready"]) for e in s["endpoints"]])
            for s in slices] == [("IPv4", [("192.0.2.10", True), ("192.0.2.11", False)]), ("IPv6", [("2001:db8::1", True)])]
    assert slices[0]["metadata"]["labels"] == {c.SERVICE_NAME_LABEL: "echo", c.MANAGED_BY: c.MIRROR_MANAGER}
    assert slices[0]["ports"] == [{"name": "db", "port": 5432, "protocol": "TCP"}]
    assert slices[0]["metadata"]["ownerReferences"][0]["uid"] == "s-uid"   # collected with the Service
    assert c.mirrored_slices([service()], [eps]) == []                    # a selector: the controller's own
    skip = {**eps, "metadata": {**eps["metadata"], "labels": {c.SKIP_MIRROR: "true"}}}
    assert c.mirrored_slices([external], [skip]) == []
    creates = c.reconcile_mirrored_slices([external], [eps], [])
    assert [a.verb for a in creates] == ["create", "create"]
    have = [stored(a.body, f"u{i}") for i, a in enumerate(creates)]
    assert c.reconcile_mirrored_slices([external], [eps], have) == []
    assert [a.verb for a in c.reconcile_mirrored_slices([external], [], have)] == ["delete", "delete"]


def daemonset(image="netplane/echo:v1", node_selector=None, tolerations=None, max_unavailable=1):
    template_spec = {"containers": [{"name": "agent", "image": image}]}
    if node_selector:
        template_spec["nodeSelector"] = node_selector
    if tolerations:
        template_spec["tolerations"] = tolerations
    return {"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "agent", "namespace": "default", "uid": "ds-uid", "generation": 1},
            "spec": {"selector": {"matchLabels": {"app": "agent"}},
                     "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": max_unavailable}},
                     "template": {"metadata": {"labels": {"app": "agent"}}, "spec": template_spec}}}


def node(name, labels=None, taints=None):
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": {"taints": taints or []}}


CONTROL_PLANE_TAINT = {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}


def test_a_daemonset_puts_one_pod_on_every_node_it_fits_and_none_elsewhere():
    nodes = [node("cp", taints=[CONTROL_PLANE_TAINT]), node("w1", {"disk": "ssd"}),
             node("w2", taints=[{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}])]   # cordoned
    names = iter(["a", "b", "c", "d"])
    actions = c.reconcile_daemonset(daemonset(), nodes, [], new_suffix=lambda: next(names))
    creates = [a.body for a in actions if a.verb == "create"]
    assert [(p["metadata"]["name"], p["spec"]["nodeName"]) for p in creates] == [("agent-a", "w1"), ("agent-b", "w2")]
    assert creates[0]["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet"
    assert c.REVISION_LABEL in creates[0]["metadata"]["labels"]
    assert {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"} in \
        creates[0]["spec"]["tolerations"]
    status = next(a.body["status"] for a in actions if a.subresource == "status")
    assert (status["desiredNumberScheduled"], status["currentNumberScheduled"], status["numberReady"]) == (2, 0, 0)
    tolerant = daemonset(tolerations=[{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}])
    assert c.daemon_nodes(tolerant, nodes) == ["cp", "w1", "w2"]
    assert c.daemon_nodes(daemonset(node_selector={"disk": "ssd"}), nodes) == ["w1"]


def daemon_pods(ds, placement, ready=True):
    """Stored pods of `ds`: {pod name: node}."""
    pods = []
    for name, node_name in placement.items():
        p = stored(c.daemon_pod(ds, node_name, name.rsplit("-", 1)[-1]), f"uid-{name}", phase="Running",
                   conditions=[{"type": "Ready", "status": "True" if ready else "False"}])
        pods.append(p)
    return pods


def test_a_daemonset_removes_strays_and_extras_and_replaces_a_stopped_pod():
    ds, nodes = daemonset(), [node("w1"), node("w2")]
    pods = daemon_pods(ds, {"agent-a": "w1", "agent-b": "w1", "agent-c": "gone"})
    deleted = sorted(a.name for a in c.reconcile_daemonset(ds, nodes, pods, new_suffix=lambda: "n") if a.verb == "delete")
    assert deleted == ["agent-b", "agent-c"]   # one per node; none on a node it does not belong on
    stopped = daemon_pods(ds, {"agent-a": "w1", "agent-b": "w2"})
    stopped[1]["status"]["phase"] = "Failed"
    verbs = [(a.verb, a.name) for a in c.reconcile_daemonset(ds, nodes, stopped, new_suffix=lambda: "n") if a.kind == "Pod"]
    assert verbs == [("delete", "agent-b"), ("create", "agent-n")]
    steady = daemon_pods(ds, {"agent-a": "w1", "agent-b": "w2"})
    settled = [a for a in c.reconcile_daemonset(ds, nodes, steady) if a.kind == "Pod"]
    assert settled == []


def test_a_template_change_rolls_node_by_node_within_max_unavailable():
    old = daemonset(image="netplane/echo:v1")
    new = daemonset(image="netplane/echo:v2")
    nodes = [node("w1"), node("w2"), node("w3")]
    pods = daemon_pods(old, {"agent-a": "w1", "agent-b": "w2", "agent-c": "w3"})
    deletes = [a.name for a in c.reconcile_daemonset(new, nodes, pods) if a.verb == "delete"]
    assert deletes == ["agent-a"]                       # maxUnavailable 1: one node at a time
    pods_during = [p for p in pods if p["metadata"]["name"] != "agent-a"]
    assert [a.verb for a in c.reconcile_daemonset(new, nodes, pods_during) if a.kind == "Pod"] == ["create"]   # no more
    two = daemonset(image="netplane/echo:v2", max_unavailable="50%")
    assert len([a for a in c.reconcile_daemonset(two, nodes, pods) if a.verb == "delete"]) == 2
    on_delete = daemonset(image="netplane/echo:v2")
    on_delete["spec"]["updateStrategy"] = {"type": "OnDelete"}
    status = next(a.body["status"] for a in c.reconcile_daemonset(on_delete, nodes, pods) if a.subresource == "status")
    assert status["updatedNumberScheduled"] == 0 and status["numberReady"] == 3


def statefulset(replicas=3, image="netplane/echo:v1", policy="OrderedReady", partition=0):
    return {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "web", "namespace": "default", "uid": "sts-uid", "generation": 1},
            "spec": {"replicas": replicas, "serviceName": "nginx", "podManagementPolicy": policy,
                     "selector": {"matchLabels": {"app": "web"}},
                     "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": partition}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "web", "image": image}]}}}}


def stateful_pods(sts, ready_by_ordinal: dict):
    return [stored(c.stateful_pod(sts, i), f"uid-{i}", phase="Running",
                   conditions=[{"type": "Ready", "status": "True" if ready else "False"}])
            for i, ready in ready_by_ordinal.items()]


def test_a_statefulset_makes_its_pods_in_order_each_ready_before_the_next():
    sts = statefulset()
    [first] = [a for a in c.reconcile_statefulset(sts, []) if a.kind == "Pod"]
    pod = first.body
    assert (first.verb, first.name) == ("create", "web-0")
    assert (pod["spec"]["hostname"], pod["spec"]["subdomain"]) == ("web-0", "nginx")   # web-0.nginx.default.svc...
    assert pod["metadata"]["labels"][c.POD_NAME_LABEL] == "web-0"
    waiting = c.reconcile_statefulset(sts, stateful_pods(sts, {0: False}))
    assert [a for a in waiting if a.kind == "Pod"] == []                           # web-0 not Ready: nothing more
    [second] = [a for a in c.reconcile_statefulset(sts, stateful_pods(sts, {0: True})) if a.kind == "Pod"]
    assert second.name == "web-1"
    parallel = statefulset(policy="Parallel")
    assert [a.name for a in c.reconcile_statefulset(parallel, []) if a.kind == "Pod"] == ["web-0", "web-1", "web-2"]
    stopped = stateful_pods(sts, {0: True}) + [{**stateful_pods(sts, {1: True})[0], "status": {"phase": "Failed"}}]
    again = [(a.verb, a.name) for a in c.reconcile_statefulset(sts, stopped) if a.kind == "Pod"]
    assert again == [("delete", "web-1"), ("create", "web-1")]                    # made again under its name


def test_a_pod_with_the_services_subdomain_gets_its_dns_hostname_in_the_endpoints():
    headless = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "nginx", "namespace": "default", "uid": "h"},
                "spec": {"clusterIP": "None", "selector": {"app": "web"}, "ports": [{"name": "web", "port": 80}]}}
    sts = statefulset()
    pods = [{**p, "status": {**p["status"], "podIP": f"10.0.0.{i}"}} for i, p in enumerate(stateful_pods(sts, {0: True, 1: True}))]
    other = {**pods[1], "metadata": {**pods[1]["metadata"], "name": "loose"}, "spec": {**pods[1]["spec"], "subdomain": "x"}}
    [slice_] = c.endpoint_slices_for(headless, [pods[0], other])
    assert {e["targetRef"]["name"]: e.get("hostname") for e in slice_["endpoints"]} == {"web-0": "web-0", "loose": None}
    eps = c.endpoints_for(headless, pods)
    assert [a.get("hostname") for a in eps["subsets"][0]["addresses"]] == ["web-0", "web-1"]


def test_a_statefulset_scales_down_from_the_highest_and_rolls_from_the_highest():
    sts = statefulset(replicas=1)
    [down] = [a for a in c.reconcile_statefulset(sts, stateful_pods(sts, {0: True, 1: True, 2: True})) if a.kind == "Pod"]
    assert (down.verb, down.name) == ("delete", "web-2")                           # one at a time, highest first
    old, new = statefulset(image="netplane/echo:v1"), statefulset(image="netplane/echo:v2")
    pods = stateful_pods(old, {0: True, 1: True, 2: True})
    [roll] = [a for a in c.reconcile_statefulset(new, pods) if a.kind == "Pod"]
    assert (roll.verb, roll.name) == ("delete", "web-2")
    status = next(a.body["status"] for a in c.reconcile_statefulset(new, pods) if a.subresource == "status")
    assert status["updatedReplicas"] == 0 and status["currentRevision"] == c._revision(old) != status["updateRevision"]
    partitioned = statefulset(image="netplane/echo:v2", partition=3)
    assert [a for a in c.reconcile_statefulset(partitioned, pods) if a.kind == "Pod"] == []   # all below the partition
    done = stateful_pods(new, {0: True, 1: True, 2: True})
    status = next(a.body["status"] for a in c.reconcile_statefulset(new, done) if a.subresource == "status")
    assert status["currentRevision"] == status["updateRevision"] and status["updatedReplicas"] == 3


def job(completions=1, parallelism=1, backoff=6, ttl=None, status=None):
    spec = {"completions": completions, "parallelism": parallelism, "backoffLimit": backoff,
            "selector": {"matchLabels": {"batch.kubernetes.io/controller-uid": "job-uid"}},
            "template": {"metadata": {"labels": {"batch.kubernetes.io/controller-uid": "job-uid"}},
                         "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox",
                                                                             "args": ["true"]}]}}}
    if ttl is not None:
        spec["ttlSecondsAfterFinished"] = ttl
    out = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "j", "namespace": "default", "uid": "job-uid"}, "spec": spec}
    if status:
        out["status"] = status
    return out


def job_pods(the_job, phases):
    pods = []
    for i, phase in enumerate(phases):
        p = stored(c.new_pod(the_job, f"p{i}"), f"uid-p{i}", phase=phase)
        pods.append(p)
    return pods


NOW = 1_796_083_200.0   # 2026-12-01T00:00:00Z


def test_a_job_runs_its_pods_parallelism_at_a_time_until_completions_succeed():
    names = iter("abcdef")
    first = c.reconcile_job(job(completions=3, parallelism=2), [], NOW, new_suffix=lambda: next(names))
    assert [a.name for a in first if a.verb == "create"] == ["j-a", "j-b"]
    status = next(a.body["status"] for a in first if a.subresource == "status")
    assert status["startTime"] == "2026-12-01T00:00:00Z" and status["active"] == 0
    running = job_pods(job(), ["Succeeded", "Running"])
    more = c.reconcile_job(job(completions=3, parallelism=2), running, NOW, new_suffix=lambda: "z")
    assert [a.name for a in more if a.verb == "create"] == ["j-z"]          # 1 left to succeed, 1 running: 1 more
    done = job_pods(job(), ["Succeeded", "Succeeded", "Succeeded"])
    [finish] = c.reconcile_job(job(completions=3, parallelism=2), done, NOW)
    status = finish.body["status"]
    assert [(k["type"], k["reason"]) for k in status["conditions"]] == [("Complete", "Completed")]
    assert status["completionTime"] == "2026-12-01T00:00:00Z" and status["succeeded"] == 3
    assert finish.event[1:3] == ("Normal", "Completed")


def test_a_job_fails_past_its_backoff_limit_and_stops_what_still_runs():
    pods = job_pods(job(), ["Failed", "Failed", "Running"])
    actions = c.reconcile_job(job(backoff=1), pods, NOW)
    assert [(a.verb, a.name) for a in actions if a.kind == "Pod"] == [("delete", "j-p2")]
    status = next(a.body["status"] for a in actions if a.subresource == "status")
    assert status["conditions"][0]["reason"] == "BackoffLimitExceeded" and status["failed"] == 2
    retry = c.reconcile_job(job(backoff=6), job_pods(job(), ["Failed"]), NOW, new_suffix=lambda: "r")
    assert [a.name for a in retry if a.verb == "create"] == ["j-r"]          # within the limit: another pod
    two = job_pods(job(), ["Failed", "Failed"])
    two[1]["status"]["containerStatuses"] = [{"state": {"terminated": {"finishedAt": "2026-12-01T00:00:00Z"}}}]
    assert [a for a in c.reconcile_job(job(), two, NOW + 19) if a.verb == "create"] == []   # 2 failures: 20 s
    assert [a.verb for a in c.reconcile_job(job(), two, NOW + 20, new_suffix=lambda: "s") if a.kind == "Pod"] == ["create"]


def test_a_work_queue_job_is_done_when_one_pod_succeeded_and_none_runs():
    waiting = c.reconcile_job(job(completions=None, parallelism=2), job_pods(job(), ["Succeeded", "Running"]), NOW)
    assert [a for a in waiting if a.kind == "Pod"] == []                     # no new pods, the running one finishes
    [finish] = c.reconcile_job(job(completions=None, parallelism=2), job_pods(job(), ["Succeeded", "Succeeded"]), NOW)
    assert finish.body["status"]["conditions"][0]["type"] == "Complete"


def test_a_finished_job_goes_after_its_ttl():
    complete = {"conditions": [{"type": "Complete", "status": "True"}], "completionTime": "2026-12-01T00:00:00Z"}
    assert c.reconcile_job(job(ttl=60, status=complete), [], NOW + 30) == []
    assert [(a.verb, a.kind) for a in c.reconcile_job(job(ttl=60, status=complete), [], NOW + 60)] == [("delete", "Job")]
    assert c.reconcile_job(job(status=complete), [], NOW + 10**6) == []     # no TTL: kept


def test_every_namespace_gets_its_default_service_account():
    namespaces = [{"metadata": {"name": n}} for n in ("default", "team", "going")]
    namespaces[2]["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    have = [{"metadata": {"name": "default", "namespace": "default"}}, {"metadata": {"name": "ci", "namespace": "team"}}]
    [create] = c.default_service_accounts(namespaces, have)
    assert (create.verb, create.kind, create.namespace, create.name) == ("create", "ServiceAccount", "team", "default")
    assert c.default_service_accounts(namespaces, have + [create.body]) == []


def test_pod_cidrs_are_allocated_once_and_skip_used_ones():
    nodes = [{"metadata": {"name": "a", "creationTimestamp": "1"}, "spec": {"podCIDR": "10.244.0.0/24"}},
             {"metadata": {"name": "b", "creationTimestamp": "2"}, "spec": {}},
             {"metadata": {"name": "c", "creationTimestamp": "3"}}]
    actions = c.allocate_pod_cidrs(nodes, "10.244.0.0/16", 24)
    assert [(a.name, a.body["spec"]["podCIDR"]) for a in actions] == [("b", "10.244.1.0/24"), ("c", "10.244.2.0/24")]
    assert actions[0].body["spec"]["podCIDRs"] == ["10.244.1.0/24"]
    full = [{"metadata": {"name": "x"}, "spec": {}}] * 2
    assert len(c.allocate_pod_cidrs(full, "10.0.0.0/24", 24)) == 1


def test_orphans_are_collected_when_their_owner_is_gone():
    d = deployment()
    rs = stored(c.replicaset_for(d), "rs-uid")
    p = pod("p", owner=rs)
    free = pod("free")
    assert c.orphans({"Deployment": [d], "ReplicaSet": [rs], "Pod": [p, free]}) == []
    assert [(a.kind, a.name) for a in c.orphans({"Deployment": [], "ReplicaSet": [rs], "Pod": [p, free]})] == [
        ("ReplicaSet", rs["metadata"]["name"])]
    assert [(a.kind, a.name) for a in c.orphans({"ReplicaSet": [], "Pod": [p]})] == [("Pod", "p")]


def test_stale_node_becomes_unknown():
    node = {"metadata": {"name": "n"}, "status": {"conditions": [
        {"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-01-01T00:00:00Z"}]}}
    start = c._parse_time("2026-01-01T00:00:00Z")
    assert c.stale_nodes([node], start + 5) == []
    [action] = c.stale_nodes([node], start + 60)
    assert action.subresource == "status"
    assert action.body["status"]["conditions"][0]["status"] == "Unknown"


def test_expectations_hold_a_replicaset_until_the_watch_shows_its_pods():
    exp = c.Expectations(ttl=10)
    exp.expect("rs", {"p1", "p2"}, {"p0"}, now=0)
    assert not exp.satisfied("rs", {"p0", "p1", "p2"}, now=1)
    assert not exp.satisfied("rs", {"p1"}, now=1)
    assert exp.satisfied("rs", {"p1", "p2"}, now=1)
    exp.expect("rs", {"p3"}, set(), now=0)
    assert exp.satisfied("rs", set(), now=11)  # expired


class FakeView:
    """The watch cache as the controller manager reads it: a fixed snapshot until the test moves it."""

    def __init__(self, objects):
        self.objects = objects

    def is_synced(self):
        return True

    def list(self, kind):
        return list(self.objects.get(kind, []))


class RecordingClient:
    def __init__(self):
        self.calls = []

    async def create(self, body):
        self.calls.append(("create", body["kind"], body["metadata"]["name"]))

    async def patch(self, kind, name, body, namespace=None, subresource=None):
        self.calls.append(("patch", kind, name))

    async def delete(self, kind, name, namespace=None):
        self.calls.append(("delete", kind, name))


def test_a_second_pass_before_the_watch_catches_up_deletes_nothing_more():
    """Scale 5 -> 2, then sync again while the watch still shows all five pods: the ReplicaSet waits
    for its deletions to show, and its pods are still its own (not orphans to delete)."""
    import asyncio
    d = stored(deployment(replicas=2), "d-uid")
    rs = stored(c.replicaset_for(d), "rs-uid")
    rs["spec"]["replicas"] = 2
    pods = [pod(f"echo-{i}", ip=f"10.244.1.{i}", owner=rs, created=f"2026-01-01T00:00:0{i}Z") for i in range(5)]
    view = FakeView({"Deployment": [d], "ReplicaSet": [rs], "Pod": pods})
    client = RecordingClient()
    manager = c.ControllerManager(client, view, c.Settings())

    asyncio.run(manager.sync())
    first = {name for verb, kind, name in client.calls if verb == "delete" and kind == "Pod"}
    assert first == {"echo-2", "echo-3", "echo-4"}  # the newest three
    client.calls.clear()
    asyncio.run(manager.sync())  # the same stale snapshot
    assert [call for call in client.calls if call[1] == "Pod"] == []
    assert ("create", "ReplicaSet", rs["metadata"]["name"]) not in client.calls


def test_a_pass_on_a_stale_view_gives_no_cidr_twice():
    """worker-2 registers first and gets 10.244.0.0/24; worker-1 (created earlier) appears before the
    watch shows worker-2's CIDR: worker-2 keeps its CIDR and worker-1 gets the next one, not the same."""
    import asyncio
    worker2 = {"kind": "Node", "metadata": {"name": "worker-2", "creationTimestamp": "2026-01-01T00:00:02Z"}, "spec": {}}
    worker1 = {"kind": "Node", "metadata": {"name": "worker-1", "creationTimestamp": "2026-01-01T00:00:01Z"}, "spec": {}}
    view = FakeView({"Node": [worker2]})
    client = RecordingClient()
    manager = c.ControllerManager(client, view, c.Settings())
    asyncio.run(manager.sync())
    assert client.calls == [("patch", "Node", "worker-2")]
    assert manager.unseen_cidrs(view.list("Node"), 0.0) == {"worker-2": "10.244.0.0/24"}
    client.calls.clear()
    view.objects["Node"] = [worker2, worker1]   # worker-2 still shown without its CIDR
    actions = c.desired_actions({k: view.list(k) for k in c.KINDS}, c.Settings(), 0.0,
                                assigned_cidrs=manager.unseen_cidrs(view.list("Node"), 0.0))
    assert [(a.name, a.body["spec"]["podCIDR"]) for a in actions if a.kind == "Node"] == [("worker-1", "10.244.1.0/24")]
    # once the watch shows it, the controller forgets its own note
    worker2["spec"]["podCIDR"] = "10.244.0.0/24"
    assert manager.unseen_cidrs(view.list("Node"), 0.0) == {}


def test_what_the_controllers_do_is_told_as_events_on_the_owner():
    d = deployment(replicas=3)
    [create_rs] = [a for a in c.reconcile_deployment(d, []) if a.kind == "ReplicaSet"]
    rs_name = create_rs.body["metadata"]["name"]
    assert create_rs.event == (d, "Normal", "ScalingReplicaSet", f"Scaled up replica set {rs_name} to 3")
    current = stored(create_rs.body, "rs-uid")
    [down] = [a for a in c.reconcile_deployment(deployment(replicas=1), [current]) if a.kind == "ReplicaSet"]
    assert down.event[2:] == ("ScalingReplicaSet", f"Scaled down replica set {rs_name} to 1")
    suffixes = iter("abc")
    created = [a for a in c.reconcile_replicaset(current, [], new_suffix=lambda: next(suffixes)) if a.verb == "create"]
    assert [a.event[2:] for a in created][0] == ("SuccessfulCreate", f"Created pod: {rs_name}-a")
    assert all(a.event[0] is current for a in created)
    one = {**current, "spec": {**current["spec"], "replicas": 0}}
    [gone] = [a for a in c.reconcile_replicaset(one, [pod("p1", owner=current)]) if a.verb == "delete"]
    assert gone.event[2:] == ("SuccessfulDelete", "Deleted pod: p1")


def test_revisions_number_each_template_and_a_rollback_becomes_the_newest():
    def annotations_patch(actions, kind):
        return [a.body["metadata"]["annotations"] for a in actions if a.kind == kind and a.verb == "patch"
                and "metadata" in a.body]
    v1 = deployment(image="netplane/echo:v1")
    first = c.reconcile_deployment(v1, [])
    [rs1_body] = [a.body for a in first if a.verb == "create"]
    assert rs1_body["metadata"]["annotations"] == {c.REVISION: "1"}
    assert annotations_patch(first, "Deployment") == [{c.REVISION: "1"}]
    rs1 = stored(rs1_body, "rs1")
    v2 = deployment(image="netplane/echo:v2")
    v2["metadata"]["annotations"] = {c.CHANGE_CAUSE: "move to v2"}
    second = c.reconcile_deployment(v2, [rs1])
    [rs2_body] = [a.body for a in second if a.verb == "create"]
    assert rs2_body["metadata"]["annotations"] == {c.REVISION: "2", c.CHANGE_CAUSE: "move to v2"}
    rs2 = stored(rs2_body, "rs2")
    v2["metadata"]["annotations"] = {c.REVISION: "2", c.CHANGE_CAUSE: "v2, said later"}   # `kubectl annotate`
    assert annotations_patch(c.reconcile_deployment(v2, [rs1, rs2]), "ReplicaSet") == [
        {c.CHANGE_CAUSE: "v2, said later"}]
    back = {**v1, "metadata": {**v1["metadata"], "annotations": {c.REVISION: "2"}}}   # `rollout undo`
    rollback = c.reconcile_deployment(back, [rs1, rs2])
    assert not [a for a in rollback if a.verb == "create"]
    assert annotations_patch(rollback, "ReplicaSet") == [{c.REVISION: "3"}]
    assert annotations_patch(rollback, "Deployment") == [{c.REVISION: "3"}]
    settled = {**rs1, "metadata": {**rs1["metadata"], "annotations": {c.REVISION: "3"}}}
    at_three = {**v1, "metadata": {**v1["metadata"], "annotations": {c.REVISION: "3"}}}
    assert annotations_patch(c.reconcile_deployment(at_three, [settled, rs2]), "ReplicaSet") == []
    assert annotations_patch(c.reconcile_deployment(at_three, [settled, rs2]), "Deployment") == []


def test_a_template_sent_back_with_go_zero_values_is_the_same_replicaset():
    plain = deployment()
    undone = deployment()
    template = undone["spec"]["template"]
    template["metadata"]["creationTimestamp"] = None          # as `kubectl rollout undo` sends it
    template["spec"]["containers"][0]["resources"] = {}
    template["spec"]["containers"][0]["env"] = []
    assert c.replicaset_for(undone)["metadata"]["name"] == c.replicaset_for(plain)["metadata"]["name"]
    other = deployment()
    other["spec"]["template"]["spec"]["containers"][0]["args"] = ["--port", "9090"]
    assert c.replicaset_for(other)["metadata"]["name"] != c.replicaset_for(plain)["metadata"]["name"]
