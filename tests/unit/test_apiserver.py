"""The API server over real HTTP on 127.0.0.1 with a temporary SQLite store."""
from __future__ import annotations

import asyncio
import json
import threading

import aiohttp
import pytest

from netplane import apiserver
from netplane.apiserver import (APIServer, json_patch, merge_patch, negotiate_discovery, parse_label_selector,
                                Selector, strategic_merge_patch)
from netplane.client import APIError, Client
from netplane.store import SQLiteStore


class RunningAPIServer:
    """An APIServer on its own event loop in a thread, so tests (and sync CLIs) can call it."""

    def __init__(self, db_path: str):
        self.db_path = db_path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "RunningAPIServer":
        self.thread.start()
        self.port = self.call(self._start())
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def _start(self) -> int:
        self.store = SQLiteStore(self.db_path, poll_interval=0.05)
        self.server = APIServer(self.store, "127.0.0.1", 6443)
        return await self.server.start("127.0.0.1:0")

    def call(self, coro, timeout: float = 10):
        """Run a coroutine on the server's loop (e.g. a compaction) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __exit__(self, *exc) -> None:
        self.call(self.server.stop())
        self.store.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def api(tmp_path):
    with RunningAPIServer(str(tmp_path / "api.db")) as server:
        yield server


def run(coro):
    return asyncio.run(coro)


async def raw(api, method: str, path: str, body=None, content_type="application/json",
              headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one request."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    all_headers = {"Content-Type": content_type, **(headers or {})}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, api.url + path, data=data, headers=all_headers) as resp:
            text = await resp.text()
            return resp.status, dict(resp.headers), json.loads(text) if text.strip().startswith("{") else {}


def pod(name, labels=None, namespace="default", node=None):
    spec = {"containers": [{"name": "c", "image": "netplane/echo", "ports": [{"containerPort": 8080}]}]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}}, "spec": spec}


def deployment(name="echo", replicas=2):
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "echo", "image": "netplane/echo",
                                                           "ports": [{"containerPort": 8080}]}]}}}}


async def with_client(api, scenario):
    client = Client(api.url)
    try:
        return await scenario(client)
    finally:
        await client.close()


# --- bootstrap, CRUD, errors ------------------------------------------------------------------

def test_bootstrap_makes_system_namespaces_and_the_kubernetes_service(api):
    async def scenario(client):
        names = {ns["metadata"]["name"] for ns in (await client.list("Namespace"))["items"]}
        assert {"default", "kube-system", "kube-public", "netplane-system"} <= names
        svc = await client.get("Service", "kubernetes", "default")
        assert svc["spec"]["clusterIP"] == "10.96.0.1"
        assert svc["spec"]["ports"] == [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]
        eps = await client.get("EndpointSlice", "kubernetes", "default")
        assert eps["metadata"]["labels"]["kubernetes.io/service-name"] == "kubernetes"
        assert eps["endpoints"][0]["addresses"] == ["127.0.0.1"]
        assert eps["ports"][0]["port"] == 6443
    run(with_client(api, scenario))


def test_create_fills_server_fields_and_crud_round_trips(api):
    async def scenario(client):
        created = await client.create(pod("web"))
        meta = created["metadata"]
        assert meta["uid"] and meta["creationTimestamp"].endswith("Z") and meta["generation"] == 1
        assert meta["namespace"] == "default" and int(meta["resourceVersion"]) > 0
        assert created["status"] == {"phase": "Pending"}
        assert await client.get("Pod", "web") == created
        listing = await client.list("Pod", "default")
        assert listing["kind"] == "PodList" and int(listing["metadata"]["resourceVersion"]) >= int(meta["resourceVersion"])
        assert [p["metadata"]["name"] for p in listing["items"]] == ["web"]
        created["metadata"]["labels"] = {"app": "web"}
        updated = await client.update(created)
        assert int(updated["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
        assert updated["metadata"]["uid"] == meta["uid"]
        assert updated["metadata"]["generation"] == 1  # labels are not spec
        deleted = await client.delete("Pod", "web")
        assert deleted["metadata"]["name"] == "web"
        assert await client.delete("Pod", "web") is None
    run(with_client(api, scenario))


def test_missing_objects_are_404_status_objects(api):
    status, _, body = run(raw(api, "GET", "/apis/apps/v1/namespaces/default/deployments/nope"))
    assert status == 404
    assert body == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": 'deployments.apps "nope" not found', "reason": "NotFound",
                    "details": {"name": "nope", "group": "apps", "kind": "deployments"}, "code": 404}
    status, _, body = run(raw(api, "GET", "/api/v1/foos"))
    assert status == 404 and body["kind"] == "Status"


def test_duplicate_create_is_409_already_exists_and_stale_update_is_409_conflict(api):
    async def scenario(client):
        first = await client.create(deployment())
        with pytest.raises(APIError) as err:
            await client.create(deployment())
        assert (err.value.status, err.value.reason) == (409, "AlreadyExists")
        await client.patch("Deployment", "echo", {"spec": {"replicas": 3}})
        stale = {**first, "spec": {**first["spec"], "replicas": 7}}
        with pytest.raises(APIError) as err:
            await client.update(stale)
        assert (err.value.status, err.value.reason) == (409, "Conflict")
        assert "the object has been modified" in err.value.message
        assert (await client.get("Deployment", "echo"))["spec"]["replicas"] == 3
    run(with_client(api, scenario))


def test_invalid_objects_are_422_naming_the_field(api):
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "noports"}, "spec": {"selector": {"a": "b"}}}
    status, _, body = run(raw(api, "POST", "/api/v1/namespaces/default/services", svc))
    assert status == 422 and body["reason"] == "Invalid"
    assert body["message"] == 'Service "noports" is invalid: spec.ports: Required value'
    assert body["details"]["causes"] == [{"reason": "FieldValueRequired", "message": "Required value",
                                          "field": "spec.ports"}]
    status, _, _ = run(raw(api, "GET", "/api/v1/namespaces/default/services/noports"))
    assert status == 404


def test_creating_in_a_missing_namespace_is_404(api):
    async def scenario(client):
        with pytest.raises(APIError) as err:
            await client.create(pod("p", namespace="nowhere"))
        assert err.value.status == 404 and 'namespaces "nowhere" not found' in err.value.message
    run(with_client(api, scenario))


# --- patches, generation, status, scale, binding -------------------------------------------

def test_merge_patch_bumps_generation_only_for_spec_changes(api):
    async def scenario(client):
        await client.create(deployment())
        labelled = await client.patch("Deployment", "echo", {"metadata": {"labels": {"team": "net"}}})
        assert labelled["metadata"]["generation"] == 1 and labelled["metadata"]["labels"] == {"team": "net"}
        scaled = await client.patch("Deployment", "echo", {"spec": {"replicas": 5}})
        assert scaled["metadata"]["generation"] == 2 and scaled["spec"]["replicas"] == 5
        same = await client.patch("Deployment", "echo", {"spec": {"replicas": 5}})
        assert same["metadata"]["resourceVersion"] == scaled["metadata"]["resourceVersion"]  # no-op
    run(with_client(api, scenario))


def test_strategic_merge_and_json_patch_over_http(api):
    async def scenario(client):
        await client.create(deployment())
    run(with_client(api, scenario))
    path = "/apis/apps/v1/namespaces/default/deployments/echo"
    smp = {"spec": {"template": {"spec": {"containers": [{"name": "echo", "image": "netplane/echo:v2"}]}}}}
    status, _, body = run(raw(api, "PATCH", path, smp, "application/strategic-merge-patch+json"))
    assert status == 200
    container = body["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "netplane/echo:v2"
    assert container["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]  # merged by name, ports kept
    ops = [{"op": "replace", "path": "/spec/replicas", "value": 4}, {"op": "test", "path": "/metadata/name", "value": "echo"}]
    status, _, body = run(raw(api, "PATCH", path, ops, "application/json-patch+json"))
    assert status == 200 and body["spec"]["replicas"] == 4
    status, _, body = run(raw(api, "PATCH", path, {"spec": {}}, "text/plain"))
    assert status == 415


def test_status_subresource_writes_only_status_and_main_writes_keep_it(api):
    async def scenario(client):
        await client.create(pod("p"))
        patched = await client.patch("Pod", "p", {"status": {"phase": "Running", "podIP": "10.244.1.5"},
                                                  "spec": {"nodeName": "ignored"}}, subresource="status")
        assert patched["status"]["podIP"] == "10.244.1.5"
        assert "nodeName" not in patched["spec"]
        patched["metadata"]["labels"] = {"x": "y"}
        patched["status"] = {"phase": "Failed"}
        updated = await client.update(patched)
        assert updated["status"]["phase"] == "Running" and updated["metadata"]["labels"] == {"x": "y"}
        put = await client.update({**updated, "status": {"phase": "Succeeded"}}, subresource="status")
        assert put["status"] == {"phase": "Succeeded"}
    run(with_client(api, scenario))


def test_ephemeral_containers_are_added_through_their_subresource_only(api):
    debug = {"name": "debugger-x", "image": "busybox", "stdin": True, "tty": True}
    path = "/api/v1/namespaces/default/pods/p/ephemeralcontainers"

    async def scenario(client):
        await client.create(pod("p"))
        added = await raw(api, "PATCH", path, {"spec": {"ephemeralContainers": [debug]}},   # as kubectl debug sends it
                          content_type="application/strategic-merge-patch+json")
        current = await client.get("Pod", "p", "default")
        dropped = await client.update({**current, "spec": {**current["spec"], "ephemeralContainers": []}})
        removed = await raw(api, "PATCH", path, {"spec": {"ephemeralContainers": None}},
                            content_type="application/merge-patch+json")
        with_ports = await raw(api, "PATCH", path, {"spec": {"ephemeralContainers": [
            debug, {"name": "two", "image": "busybox", "ports": [{"containerPort": 1}]}]}},
            content_type="application/merge-patch+json")
        clash = await raw(api, "PATCH", path, {"spec": {"ephemeralContainers": [debug, {"name": "c", "image": "b"}]}},
                          content_type="application/merge-patch+json")
        got = await raw(api, "GET", path)
        return added, dropped, removed, with_ports, clash, got
    added, dropped, removed, with_ports, clash, got = run(with_client(api, scenario))
    assert added[0] == 200 and added[2]["spec"]["ephemeralContainers"] == [debug]
    assert added[2]["spec"]["containers"][0]["name"] == "c"                     # the rest of the pod as it was
    assert dropped["spec"]["ephemeralContainers"] == [debug]                   # a main write cannot touch them
    assert removed[0] == 422 and 'existing ephemeral containers "debugger-x" may not be removed' in removed[2]["message"]
    assert with_ports[0] == 422 and "spec.ephemeralContainers[1].ports" in with_ports[2]["message"]
    assert clash[0] == 422 and "spec.ephemeralContainers[1].name" in clash[2]["message"]   # a container's name
    assert got[0] == 200 and got[2]["kind"] == "Pod"


def test_a_job_gets_a_selector_naming_its_uid_and_must_stop(api):
    body = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "pi"},
            "spec": {"template": {"spec": {"restartPolicy": "Never",
                                           "containers": [{"name": "pi", "image": "busybox", "args": ["true"]}]}}}}

    async def scenario():
        created = await raw(api, "POST", "/apis/batch/v1/namespaces/default/jobs", body)
        always = await raw(api, "POST", "/apis/batch/v1/namespaces/default/jobs",
                           {**body, "metadata": {"name": "forever"},
                            "spec": {"template": {"spec": {"containers": body["spec"]["template"]["spec"]["containers"]}}}})
        return created, always
    created, always = run(scenario())
    assert created[0] == 201
    job = created[2]
    uid = job["metadata"]["uid"]
    assert job["spec"]["selector"] == {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    assert job["spec"]["template"]["metadata"]["labels"]["batch.kubernetes.io/job-name"] == "pi"
    assert (job["spec"]["completions"], job["spec"]["parallelism"], job["spec"]["backoffLimit"]) == (1, 1, 6)
    assert always[0] == 422 and 'spec.template.spec.restartPolicy: Unsupported value: "Always"' in always[2]["message"]


def test_binding_sets_node_name_once(api):
    async def scenario(client):
        await client.create(pod("p"))
        await client.bind("p", "default", "worker-1")
        bound = await client.get("Pod", "p")
        assert bound["spec"]["nodeName"] == "worker-1"
        assert {"type": "PodScheduled", "status": "True"}.items() <= bound["status"]["conditions"][0].items()
        with pytest.raises(APIError) as err:
            await client.bind("p", "default", "worker-2")
        assert err.value.status == 409 and 'already assigned to node "worker-1"' in err.value.message
    run(with_client(api, scenario))


def test_scale_subresource(api):
    async def scenario(client):
        await client.create(deployment(replicas=3))
    run(with_client(api, scenario))
    path = "/apis/apps/v1/namespaces/default/deployments/echo/scale"
    status, _, scale = run(raw(api, "GET", path))
    assert status == 200 and scale["kind"] == "Scale" and scale["apiVersion"] == "autoscaling/v1"
    assert scale["spec"] == {"replicas": 3} and scale["status"]["selector"] == "app=echo"
    status, _, scale = run(raw(api, "PATCH", path, {"spec": {"replicas": 5}}, "application/merge-patch+json"))
    assert status == 200 and scale["spec"]["replicas"] == 5
    _, _, dep = run(raw(api, "GET", "/apis/apps/v1/namespaces/default/deployments/echo"))
    assert dep["spec"]["replicas"] == 5
    status, _, body = run(raw(api, "PUT", path, {"spec": {"replicas": -1}}))
    assert status == 422 and body["details"]["causes"][0]["field"] == "spec.replicas"


# --- services: allocation ------------------------------------------------------------------

def test_services_get_cluster_ips_and_node_ports_and_clashes_are_422(api):
    async def scenario(client):
        svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"type": "NodePort", "selector": {"app": "web"}, "ports": [{"port": 80, "nodePort": 30080}]}}
        created = await client.create(svc)
        assert created["spec"]["clusterIP"].startswith("10.9")
        assert created["spec"]["ports"][0]["nodePort"] == 30080
        clash = {**svc, "metadata": {"name": "web2"}}
        with pytest.raises(APIError) as err:
            await client.create(clash)
        assert err.value.status == 422 and "spec.ports[0].nodePort" in err.value.message
        taken_ip = {**svc, "metadata": {"name": "web3"},
                    "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}
        with pytest.raises(APIError) as err:
            await client.create(taken_ip)
        assert "spec.clusterIP" in err.value.message and "already allocated" in err.value.message
        # re-applying without nodePort keeps the allocated one
        again = await client.update({**svc, "metadata": created["metadata"],
                                     "spec": {"type": "NodePort", "selector": {"app": "web"}, "ports": [{"port": 80}]}})
        assert again["spec"]["ports"][0]["nodePort"] == 30080
        assert again["spec"]["clusterIP"] == created["spec"]["clusterIP"]
        await client.delete("Service", "web")
        assert (await client.create(clash))["spec"]["ports"][0]["nodePort"] == 30080  # released on delete
    run(with_client(api, scenario))


def test_allocations_are_rebuilt_after_a_restart(tmp_path):
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dns", "namespace": "kube-system"},
           "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 53, "protocol": "UDP"}]}}
    with RunningAPIServer(str(tmp_path / "api.db")) as api:
        run(with_client(api, lambda c: c.create(svc)))
    with RunningAPIServer(str(tmp_path / "api.db")) as api:
        async def scenario(client):
            with pytest.raises(APIError) as err:
                await client.create({**svc, "metadata": {"name": "dns2", "namespace": "kube-system"}})
            assert "already allocated" in err.value.message
            assert (await client.get("Service", "kubernetes"))["spec"]["clusterIP"] == "10.96.0.1"
        run(with_client(api, scenario))


# --- lists, selectors ----------------------------------------------------------------------

def test_label_and_field_selectors_and_cluster_wide_lists(api):
    async def scenario(client):
        await client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}})
        await client.create(pod("a", {"app": "web", "tier": "front"}, node="worker-1"))
        await client.create(pod("b", {"app": "web", "tier": "back"}, node="worker-2"))
        await client.create(pod("c", {"app": "db"}, namespace="team", node="worker-1"))

        async def names(namespace=None, labels=None, fields=None):
            listing = await client.list("Pod", namespace, labels, fields)
            return sorted(p["metadata"]["name"] for p in listing["items"])
        assert await names() == ["a", "b", "c"]  # /api/v1/pods: every namespace
        assert await names("default") == ["a", "b"]
        assert await names(labels="app=web") == ["a", "b"]
        assert await names(labels="app==web,tier!=front") == ["b"]
        assert await names(labels="tier in (front, back)") == ["a", "b"]
        assert await names(labels="app notin (web)") == ["c"]
        assert await names(labels="tier") == ["a", "b"]
        assert await names(labels="!tier") == ["c"]
        assert await names(fields="spec.nodeName=worker-1") == ["a", "c"]
        assert await names(fields="metadata.namespace=team") == ["c"]
        assert await names(fields="metadata.name!=a,status.phase=Pending") == ["b", "c"]
        with pytest.raises(APIError) as err:
            await client.list("Pod", None, "app in (web")
        assert err.value.status == 400
    run(with_client(api, scenario))


# --- watch ---------------------------------------------------------------------------------

async def events_of(client, count, **kwargs) -> list[tuple[str, str, dict]]:
    got = []
    async for event_type, obj in client.watch("Pod", **kwargs):
        got.append((event_type, obj["metadata"].get("name"), obj))
        if len(got) == count:
            break
    return got


def test_watch_from_a_resource_version_replays_changes_in_order(api):
    async def scenario(client):
        start = (await client.create(pod("a", {"app": "web"})))["metadata"]["resourceVersion"]
        await client.create(pod("b", {"app": "web"}))
        await client.patch("Pod", "a", {"metadata": {"labels": {"app": "web", "v": "2"}}})
        await client.delete("Pod", "b")
        got = await asyncio.wait_for(events_of(client, 3, namespace="default", resource_version=start), 5)
        assert [(t, n) for t, n, _ in got] == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
        versions = [int(o["metadata"]["resourceVersion"]) for _, _, o in got]
        assert versions == sorted(versions) and versions[0] > int(start)
    run(with_client(api, scenario))


def test_watch_without_a_version_starts_with_the_current_objects_then_goes_live(api):
    async def scenario(client):
        await client.create(pod("a"))

        async def add_later():
            await asyncio.sleep(0.2)
            await client.create(pod("b"))
        adder = asyncio.create_task(add_later())
        got = await asyncio.wait_for(events_of(client, 2, namespace="default", resource_version="0"), 5)
        await adder
        assert [(t, n) for t, n, _ in got] == [("ADDED", "a"), ("ADDED", "b")]
    run(with_client(api, scenario))


def test_watch_through_a_label_selector_sees_objects_enter_and_leave(api):
    async def scenario(client):
        start = (await client.create(pod("a", {"app": "web"})))["metadata"]["resourceVersion"]
        await client.patch("Pod", "a", {"metadata": {"labels": {"app": "db"}}})
        await client.patch("Pod", "a", {"metadata": {"labels": {"app": "web"}}})
        got = await asyncio.wait_for(events_of(client, 2, namespace="default", resource_version=start,
                                                label_selector="app=web"), 5)
        assert [(t, n) for t, n, _ in got] == [("DELETED", "a"), ("ADDED", "a")]
    run(with_client(api, scenario))


def test_watch_from_a_compacted_version_is_an_error_event_410(api):
    async def scenario(client):
        old = (await client.create(pod("a")))["metadata"]["resourceVersion"]
        await client.patch("Pod", "a", {"metadata": {"labels": {"x": "1"}}})
        latest = await client.patch("Pod", "a", {"metadata": {"labels": {"x": "2"}}})
        api.call(api.store.compact(int(latest["metadata"]["resourceVersion"])))
        with pytest.raises(APIError) as err:
            await asyncio.wait_for(events_of(client, 1, namespace="default", resource_version=old), 5)
        assert (err.value.status, err.value.reason) == (410, "Expired")
    run(with_client(api, scenario))


def test_watch_ends_at_timeout_seconds(api):
    async def scenario(client):
        rv = (await client.list("Pod"))["metadata"]["resourceVersion"]
        got = await asyncio.wait_for(events_of(client, 99, resource_version=rv, timeout_seconds=1), 5)
        assert got == []
    run(with_client(api, scenario))


def test_a_disconnected_watch_client_leaves_no_watcher_behind(api):
    def watchers() -> float:
        return apiserver.WATCHERS.labels("pods")._value.get()
    before = watchers()

    async def scenario():
        async with aiohttp.ClientSession() as session:
            resp = await session.get(api.url + "/api/v1/pods?watch=true")
            assert resp.status == 200
            deadline = asyncio.get_running_loop().time() + 5
            while watchers() == before and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
            assert watchers() == before + 1
            resp.close()  # drop the connection mid-stream
        deadline = asyncio.get_running_loop().time() + 5
        while watchers() != before and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        assert watchers() == before
    run(scenario())


def test_watch_of_one_object_by_its_path(api):
    async def scenario(client):
        await client.create(pod("a"))
        await client.create(pod("b"))
        async with client.session.get(api.url + "/api/v1/namespaces/default/pods/b?watch=1&timeoutSeconds=1") as resp:
            lines = [json.loads(line) for line in (await resp.text()).splitlines() if line]
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in lines] == [("ADDED", "b")]
    run(with_client(api, scenario))


# --- deletion cascades ---------------------------------------------------------------------

def test_deleting_an_owner_deletes_its_dependents_and_a_namespace_its_contents(api):
    async def scenario(client):
        owner = await client.create(deployment())
        ref = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "echo", "uid": owner["metadata"]["uid"],
               "controller": True}
        owned = pod("echo-1")
        owned["metadata"]["ownerReferences"] = [ref]
        await client.create(owned)
        await client.create(pod("free"))
        await client.delete("Deployment", "echo")
        assert [p["metadata"]["name"] for p in (await client.list("Pod", "default"))["items"]] == ["free"]
        await client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tmp"}})
        await client.create(pod("x", namespace="tmp"))
        await client.delete("Namespace", "tmp")
        assert (await client.list("Pod", "tmp"))["items"] == []
        with pytest.raises(APIError) as err:
            await client.delete("Namespace", "default")
        assert err.value.status == 403
    run(with_client(api, scenario))


# --- discovery, version, health, metrics ---------------------------------------------------

def test_legacy_discovery(api):
    status, _, body = run(raw(api, "GET", "/api", headers={"Accept": "application/json"}))
    assert status == 200 and body["kind"] == "APIVersions" and body["versions"] == ["v1"]
    _, _, groups = run(raw(api, "GET", "/apis"))
    assert {g["name"] for g in groups["groups"]} == {"apps", "batch", "discovery.k8s.io", "networking.k8s.io", "metrics.k8s.io",
                                                    "authorization.k8s.io", "authentication.k8s.io"}
    _, _, core = run(raw(api, "GET", "/api/v1"))
    pods = next(r for r in core["resources"] if r["name"] == "pods")
    assert pods["namespaced"] and pods["kind"] == "Pod" and "watch" in pods["verbs"] and pods["shortNames"] == ["po"]
    assert {"pods/status", "pods/binding"} <= {r["name"] for r in core["resources"]}
    _, _, apps = run(raw(api, "GET", "/apis/apps/v1"))
    assert apps["groupVersion"] == "apps/v1"
    scale = next(r for r in apps["resources"] if r["name"] == "deployments/scale")
    assert (scale["group"], scale["version"], scale["kind"]) == ("autoscaling", "v1", "Scale")
    status, _, group = run(raw(api, "GET", "/apis/apps"))
    assert status == 200 and group["preferredVersion"]["groupVersion"] == "apps/v1"


def test_kubectl_auth_can_i_and_whoami_are_answered_as_an_open_lab(api):
    async def scenario():
        can_i = await raw(api, "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                          {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                           "spec": {"resourceAttributes": {"verb": "delete", "resource": "nodes"}}})
        rules = await raw(api, "POST", "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews",
                          {"kind": "SelfSubjectRulesReview", "spec": {"namespace": "default"}})
        whoami = await raw(api, "POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                           {"kind": "SelfSubjectReview"})
        neither = await raw(api, "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", {"spec": {}})
        other = await raw(api, "POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", {"kind": "Pod"})
        listed = await raw(api, "GET", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews")
        discovery = await raw(api, "GET", "/apis/authorization.k8s.io/v1")
        return can_i, rules, whoami, neither, other, listed, discovery
    can_i, rules, whoami, neither, other, listed, discovery = run(scenario())
    assert can_i[0] == 201 and can_i[2]["status"]["allowed"] is True and "AlwaysAllow" in can_i[2]["status"]["reason"]
    assert can_i[2]["spec"]["resourceAttributes"]["resource"] == "nodes"
    assert rules[2]["status"]["resourceRules"] == [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}]
    assert whoami[2]["status"]["userInfo"] == {"username": "system:anonymous", "groups": ["system:unauthenticated"]}
    assert neither[0] == 422 and "exactly one of nonResourceAttributes or resourceAttributes" in neither[2]["message"]
    assert other[0] == 400
    assert listed[0] == 405   # nothing is stored: only POST
    assert {(r["name"], tuple(r["verbs"])) for r in discovery[2]["resources"]} == {
        ("selfsubjectaccessreviews", ("create",)), ("selfsubjectrulesreviews", ("create",))}


def test_aggregated_discovery_is_negotiated_on_accept(api):
    accept = ("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,"
              "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json")
    status, headers, body = run(raw(api, "GET", "/apis", headers={"Accept": accept}))
    assert status == 200
    assert headers["Content-Type"] == "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
    assert body["apiVersion"] == "apidiscovery.k8s.io/v2"
    apps = next(i for i in body["items"] if i["metadata"]["name"] == "apps")
    deploy = next(r for r in apps["versions"][0]["resources"] if r["resource"] == "deployments")
    assert deploy["shortNames"] == ["deploy"] and deploy["categories"] == ["all"]
    assert deploy["subresources"][0]["responseKind"]["kind"] in ("Deployment", "Scale")
    old = accept.split(",", 1)[1]  # kubectl 1.27-1.29 asks only for v2beta1
    _, headers, body = run(raw(api, "GET", "/api", headers={"Accept": old}))
    assert "v=v2beta1" in headers["Content-Type"] and body["items"][0]["metadata"]["name"] == ""


def test_version_health_openapi_and_metrics(api):
    for path in ("/version", "/version/"):
        status, _, body = run(raw(api, "GET", path))
        assert status == 200 and body["major"] == "1"
    _, _, index = run(raw(api, "GET", "/openapi/v3"))
    url = index["paths"]["apis/apps/v1"]["serverRelativeURL"]
    _, _, doc = run(raw(api, "GET", url))
    patch = doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"]
    assert patch["x-kubernetes-group-version-kind"]["kind"] == "Deployment"

    async def text(path):
        async with aiohttp.ClientSession() as session:
            async with session.get(api.url + path) as resp:
                return resp.status, await resp.text()
    assert run(text("/healthz")) == (200, "ok")
    assert run(text("/readyz")) == (200, "ok")
    status, metrics = run(text("/metrics"))
    assert status == 200 and 'netplane_apiserver_requests_total{code="200",resource="discovery",verb="get"}' in metrics


# --- pure helpers --------------------------------------------------------------------------

def test_label_selector_parsing():
    assert parse_label_selector("a=b,c!=d, e in (x, y),f notin (z),g,!h") == [
        ("a", "=", ("b",)), ("c", "!=", ("d",)), ("e", "in", ("x", "y")), ("f", "notin", ("z",)),
        ("g", "exists", ()), ("h", "!exists", ())]
    select = Selector("app=web,tier notin (db)", "spec.nodeName=n1")
    assert select({"metadata": {"labels": {"app": "web"}}, "spec": {"nodeName": "n1"}})
    assert not select({"metadata": {"labels": {"app": "web", "tier": "db"}}, "spec": {"nodeName": "n1"}})
    assert not select({"metadata": {"labels": {"app": "web"}}, "spec": {}})


def test_merge_patch_rfc7386():
    target = {"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]}
    assert merge_patch(target, {"a": "z", "c": {"f": None}, "l": [3]}) == {"a": "z", "c": {"d": "e"}, "l": [3]}
    assert target["c"] == {"d": "e", "f": "g"}  # input untouched


def test_json_patch_rfc6902():
    doc = {"a": {"b": [1, 2]}, "c": 1}
    out = json_patch(doc, [{"op": "add", "path": "/a/b/-", "value": 3}, {"op": "remove", "path": "/c"},
                           {"op": "copy", "from": "/a/b", "path": "/d"}, {"op": "move", "from": "/d", "path": "/e"},
                           {"op": "replace", "path": "/a/b/0", "value": 9}])
    assert out == {"a": {"b": [9, 2, 3]}, "e": [1, 2, 3]}
    with pytest.raises(apiserver.APIStatus):
        json_patch(doc, [{"op": "test", "path": "/c", "value": 2}])


def test_strategic_merge_patch_subset():
    live = {"spec": {"containers": [{"name": "a", "image": "x", "ports": [{"containerPort": 80}]},
                                    {"name": "b", "image": "y"}],
                     "tolerations": [{"key": "k"}]}}
    patch = {"spec": {"$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
                      "containers": [{"name": "a", "image": "x2"}, {"name": "b", "$patch": "delete"},
                                     {"name": "c", "image": "z"}],
                      "tolerations": [{"key": "other"}]}}
    out = strategic_merge_patch(live, patch)
    assert out["spec"]["containers"] == [{"name": "a", "image": "x2", "ports": [{"containerPort": 80}]},
                                         {"name": "c", "image": "z"}]
    assert out["spec"]["tolerations"] == [{"key": "other"}]  # lists without a merge key replace


def test_discovery_negotiation():
    assert negotiate_discovery("application/json") is None
    assert negotiate_discovery("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList") == "v2"
    assert negotiate_discovery("application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,"
                               "application/json") == "v2beta1"
    assert negotiate_discovery("application/json,application/json;g=apidiscovery.k8s.io;v=v2;"
                               "as=APIGroupDiscoveryList") is None


# --- kubectl's Table responses -------------------------------------------------------------

TABLE_ACCEPT = ("application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;"
                "g=meta.k8s.io,application/json")


def test_lists_and_gets_answer_tables_when_kubectl_asks(api):
    status, headers, table = run(raw(api, "GET", "/api/v1/namespaces/default/services",
                                     headers={"Accept": TABLE_ACCEPT}))
    assert status == 200 and headers["Content-Type"] == "application/json;as=Table;v=v1;g=meta.k8s.io"
    assert table["kind"] == "Table" and table["apiVersion"] == "meta.k8s.io/v1"
    assert [c["name"] for c in table["columnDefinitions"] if c["priority"] == 0] == \
        ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    (row,) = table["rows"]
    assert row["cells"][:5] == ["kubernetes", "ClusterIP", "10.96.0.1", "<none>", "443/TCP"]
    assert row["object"]["kind"] == "PartialObjectMetadata"
    assert row["object"]["metadata"]["namespace"] == "default"  # kubectl -A reads it from here
    _, _, one = run(raw(api, "GET", "/api/v1/namespaces/default/services/kubernetes?includeObject=Object",
                        headers={"Accept": TABLE_ACCEPT}))
    assert one["rows"][0]["object"]["spec"]["clusterIP"] == "10.96.0.1"


def test_watch_events_are_tables_when_kubectl_asks(api):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            url = api.url + "/api/v1/namespaces/default/services?watch=1&timeoutSeconds=1"
            async with session.get(url, headers={"Accept": TABLE_ACCEPT}) as resp:
                return [json.loads(line) for line in (await resp.text()).splitlines() if line]
    (event,) = run(scenario())
    assert event["type"] == "ADDED" and event["object"]["kind"] == "Table"
    assert event["object"]["rows"][0]["cells"][0] == "kubernetes"


# --- the daemon ----------------------------------------------------------------------------

def test_the_daemon_serves_and_stops_cleanly_on_sigterm(tmp_path):
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:  # a free port for the daemon
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "netplane", "apiserver", "--listen", f"127.0.0.1:{port}",
                             "--db", str(tmp_path / "d.db")], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                    assert resp.read() == b"ok"
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/namespaces/default/services/kubernetes") as resp:
            assert json.load(resp)["spec"]["ports"][0]["targetPort"] == port
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        logs = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
        assert {"serving", "stopped"} <= {entry["msg"] for entry in logs}
        assert all(entry["component"] == "apiserver" for entry in logs)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_dry_run_checks_everything_and_stores_nothing(api):
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30099}]}}
    base = "/api/v1/namespaces/default/services"
    status, _, body = run(raw(api, "POST", base + "?dryRun=All", svc))
    assert status == 201 and body["spec"]["ports"][0]["nodePort"] == 30099
    assert run(raw(api, "GET", base + "/web"))[0] == 404
    status, _, body = run(raw(api, "POST", base + "?dryRun=All", {**svc, "spec": {}}))
    assert status == 422  # still validated
    assert run(raw(api, "POST", base, svc))[0] == 201  # the dry run allocated nothing that stuck
    status, _, body = run(raw(api, "PATCH", base + "/web?dryRun=All", {"metadata": {"labels": {"a": "b"}}},
                              "application/merge-patch+json"))
    assert status == 200 and body["metadata"]["labels"] == {"a": "b"}
    assert "labels" not in run(raw(api, "GET", base + "/web"))[2]["metadata"]
    assert run(raw(api, "DELETE", base + "/web?dryRun=All"))[0] == 200
    assert run(raw(api, "GET", base + "/web"))[0] == 200
