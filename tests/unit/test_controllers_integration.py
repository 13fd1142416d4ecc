"""The controller manager and the scheduler as real processes against a real API server on loopback:
a Deployment becomes pods bound across Ready nodes, ready pods land in the Service's EndpointSlice,
and scaling down shrinks both."""
from __future__ import annotations

import sys
import time

from netplane.controllers import SERVICE_NAME_LABEL

def node(name):
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}


def ready_status():
    # A fresh heartbeat: the node lifecycle controller marks a node NotReady once its beat is older
    # than the grace period, and a timestamp taken at import would be stale in a long run.
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"status": {"conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": now}]}}


DEPLOYMENT = {
    "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "default"},
    "spec": {"replicas": 4, "selector": {"matchLabels": {"app": "web"}},
             "template": {"metadata": {"labels": {"app": "web"}},
                          "spec": {"containers": [{"name": "web", "image": "netplane/echo",
                                                   "ports": [{"name": "http", "containerPort": 8080}]}]}}}}
SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
           "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}


def wait_for(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def web_pods(api):
    return api.call("list", "Pod", "default", label_selector="app=web")["items"]


def slice_addresses(api):
    slices = api.call("list", "EndpointSlice", "default", label_selector=f"{SERVICE_NAME_LABEL}=web")["items"]
    return sorted(e["addresses"][0] for s in slices for e in s["endpoints"] if e["conditions"]["ready"])


def test_deployment_to_bound_pods_to_endpoint_slice_and_back(api_server, tmp_path):
    api = api_server
    for name in ("node-a", "node-b"):
        api.call("create", node(name))
        api.call("patch", "Node", name, ready_status(), subresource="status")
    api.start([sys.executable, "-m", "netplane", "controller-manager", "--server", api.url],
              tmp_path / "controllers.log")
    api.start([sys.executable, "-m", "netplane", "scheduler", "--server", api.url], tmp_path / "scheduler.log")
    api.call("create", DEPLOYMENT)
    api.call("create", SERVICE)

    pods = wait_for(lambda: (p := web_pods(api)) and len(p) == 4 and all(x["spec"].get("nodeName") for x in p) and p)
    per_node = {n: sum(1 for p in pods if p["spec"]["nodeName"] == n) for n in ("node-a", "node-b")}
    assert per_node == {"node-a": 2, "node-b": 2}, per_node
    assert wait_for(lambda: api.call("list", "Node")["items"][0]["spec"].get("podCIDR"))

    # Play the node agent: each pod gets an IP and turns Ready.
    for index, pod in enumerate(pods):
        status = {"status": {"phase": "Running", "podIP": f"10.244.0.{index + 10}",
                             "conditions": [{"type": "Ready", "status": "True"}]}}
        api.call("patch", "Pod", pod["metadata"]["name"], status, "default", "status")
    wanted = sorted(f"10.244.0.{i + 10}" for i in range(4))
    assert wait_for(lambda: slice_addresses(api) == wanted)
    deploy = wait_for(lambda: (d := api.call("get", "Deployment", "web", "default")).get("status", {})
                      .get("readyReplicas") == 4 and d)
    assert deploy["status"]["replicas"] == 4

    api.call("patch", "Deployment", "web", {"spec": {"replicas": 1}}, "default")
    wait_for(lambda: len(web_pods(api)) == 1)
    survivor = web_pods(api)[0]["status"]["podIP"]
    assert wait_for(lambda: slice_addresses(api) == [survivor])

    api.call("delete", "Deployment", "web", "default")
    assert wait_for(lambda: web_pods(api) == [] and api.call("list", "ReplicaSet", "default")["items"] == [])
