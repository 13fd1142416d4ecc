"""`netplane apply/get/delete`: checks before sending, kubectl-shaped output, against a real API server."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from netplane import kinds
from netplane.kubectl import (apply_main, apply_plan, check_documents, delete_main, format_table, get_main,
                              human_duration, parse_manifest, render)
from tests.unit.test_apiserver import RunningAPIServer

GOOD = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
  labels: {app: echo}
spec:
  replicas: 2
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      containers:
      - {name: echo, image: netplane/echo, ports: [{containerPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata:
  name: echo
spec:
  selector: {app: echo}
  ports:
  - {port: 80, targetPort: 8080}
"""

BAD_SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: noports
spec:
  selector: {app: echo}
"""


@pytest.fixture
def api(tmp_path):
    with RunningAPIServer(str(tmp_path / "api.db")) as server:
        yield server


def write(tmp_path, name, text) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def netplane(main, api, *argv) -> int:
    return main([*argv, "--server", api.url])


# --- checks before anything is sent --------------------------------------------------------

def test_documents_are_numbered_as_in_the_file():
    docs = parse_manifest("---\n" + GOOD + "---\n---\n" + BAD_SERVICE, "f.yaml")  # an empty document 3
    assert [(d.index, d.obj["kind"]) for d in docs] == [(1, "Deployment"), (2, "Service"), (4, "Service")]
    assert docs[2].describe() == "Service default/noports"


def test_check_names_the_file_document_kind_and_field():
    docs = parse_manifest(GOOD + "---\n" + BAD_SERVICE, "f.yaml")
    assert check_documents(docs, "f.yaml", None) == [
        "f.yaml: document 3 (Service default/noports): spec.ports: Required value"]


def test_a_bad_document_stores_nothing_from_the_file(api, tmp_path, capsys):
    path = write(tmp_path, "app.yaml", GOOD + "---\n" + BAD_SERVICE)
    assert netplane(apply_main, api, "-f", path) == 1
    err = capsys.readouterr().err
    assert f"error: {path}: document 3 (Service default/noports): spec.ports: Required value" in err
    assert netplane(get_main, api, "deployments", "echo") == 1  # the good documents were not sent
    assert 'deployments.apps "echo" not found' in capsys.readouterr().err


def test_unknown_kinds_and_broken_yaml_are_errors_naming_the_document(api, tmp_path, capsys):
    path = write(tmp_path, "odd.yaml", GOOD + "---\napiVersion: v1\nkind: Gadget\nmetadata: {name: g}\n")
    assert netplane(apply_main, api, "-f", path) == 1
    assert f"error: {path}: document 3 (Gadget g): unknown kind 'Gadget'" in capsys.readouterr().err
    broken = write(tmp_path, "broken.yaml", GOOD + "---\nkind: [unclosed\n")
    assert netplane(apply_main, api, "-f", broken) == 1
    assert f"{broken}: document 3, line " in capsys.readouterr().err  # after GOOD's two documents
    assert netplane(get_main, api, "svc", "echo") == 1  # nothing from the file was stored


# --- apply, get, delete --------------------------------------------------------------------

def test_apply_creates_then_leaves_unchanged_then_configures(api, tmp_path, capsys):
    path = write(tmp_path, "app.yaml", GOOD)
    assert netplane(apply_main, api, "-f", path) == 0
    assert capsys.readouterr().out == "deployment.apps/echo created\nservice/echo created\n"
    assert netplane(apply_main, api, "-f", path) == 0
    assert capsys.readouterr().out == "deployment.apps/echo unchanged\nservice/echo unchanged\n"
    changed = GOOD.replace("replicas: 2", "replicas: 4").replace("labels: {app: echo}\nspec:\n  replicas",
                                                                   "labels: {}\nspec:\n  replicas")
    assert netplane(apply_main, api, "-f", write(tmp_path, "v2.yaml", changed)) == 0
    assert capsys.readouterr().out == "deployment.apps/echo configured\nservice/echo unchanged\n"
    assert netplane(get_main, api, "deploy", "echo", "-o", "json") == 0
    live = json.loads(capsys.readouterr().out)
    assert live["spec"]["replicas"] == 4
    assert live["metadata"].get("labels") in (None, {})  # the dropped label is removed


def test_get_prints_kubectl_tables_and_json(api, tmp_path, capsys):
    netplane(apply_main, api, "-f", write(tmp_path, "app.yaml", GOOD))
    capsys.readouterr()
    assert netplane(get_main, api, "svc") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    assert lines[1].split()[:5] == ["echo", "ClusterIP", lines[1].split()[2], "<none>", "80/TCP"]
    assert lines[2].split()[:5] == ["kubernetes", "ClusterIP", "10.96.0.1", "<none>", "443/TCP"]
    assert netplane(get_main, api, "services", "-o", "json") == 0
    listing = json.loads(capsys.readouterr().out)
    assert list(listing) == ["apiVersion", "items", "kind", "metadata"]
    assert (listing["apiVersion"], listing["kind"], listing["metadata"]) == ("v1", "List", {"resourceVersion": ""})
    assert [i["kind"] for i in listing["items"]] == ["Service", "Service"]
    assert netplane(get_main, api, "svc/echo", "-o", "json") == 0
    assert json.loads(capsys.readouterr().out)["metadata"]["name"] == "echo"
    assert netplane(get_main, api, "ns", "-o", "name") == 0
    assert "namespace/kube-system" in capsys.readouterr().out.splitlines()
    assert netplane(get_main, api, "svc", "-A", "-l", "provider=kubernetes") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["NAMESPACE", "NAME"] and out[1].split()[:2] == ["default", "kubernetes"]
    assert netplane(get_main, api, "pods") == 0
    assert capsys.readouterr().err == "No resources found in default namespace.\n"
    assert netplane(get_main, api, "gadgets") == 1
    assert "doesn't have a resource type" in capsys.readouterr().err


def test_delete_reports_not_found_without_failing(api, tmp_path, capsys):
    path = write(tmp_path, "app.yaml", GOOD)
    netplane(apply_main, api, "-f", path)
    capsys.readouterr()
    assert netplane(delete_main, api, "-f", path) == 0
    assert capsys.readouterr().out == 'deployment.apps "echo" deleted\nservice "echo" deleted\n'
    assert netplane(delete_main, api, "-f", path) == 0
    err = capsys.readouterr().err
    assert f'Error from server (NotFound): error when deleting "{path}": services "echo" not found' in err


# --- pure formatting -----------------------------------------------------------------------

def test_apply_plan_ignores_server_filled_fields():
    manifest = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "default"},
                "spec": {"type": "NodePort", "ports": [{"port": 80}]}}
    outcome, created = apply_plan(manifest, None)
    assert outcome == "created"
    live = {**created, "spec": {"type": "NodePort", "clusterIP": "10.96.1.1", "sessionAffinity": "None",
                                "internalTrafficPolicy": "Cluster", "externalTrafficPolicy": "Cluster",
                                "ports": [{"port": 80, "protocol": "TCP", "targetPort": 80, "nodePort": 30001}]},
            "status": {"loadBalancer": {}}}
    assert apply_plan(manifest, live) == ("unchanged", None)
    outcome, patch = apply_plan({**manifest, "spec": {"type": "NodePort", "ports": [{"port": 81}]}}, live)
    assert outcome == "configured" and patch["spec"]["ports"] == [{"port": 81}]


def test_human_duration_matches_kubectl():
    assert [human_duration(s) for s in (5, 119, 125, 600, 3 * 3600 + 60, 9 * 3600, 3 * 86400 + 3600, 30 * 86400)] == \
        ["5s", "119s", "2m5s", "10m", "3h1m", "9h", "3d1h", "30d"]


def test_endpoints_print_as_kubectl_get_endpoints():
    from netplane.kubectl import _endpoints_text
    eps = {"subsets": [{"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}], "ports": [{"port": 80}, {"port": 443}]}]}
    assert _endpoints_text(eps) == "10.0.0.1:80,10.0.0.2:80,10.0.0.1:443 + 1 more..."
    assert _endpoints_text({"subsets": [{"addresses": [{"ip": "10.0.0.1"}]}]}) == "10.0.0.1"
    assert _endpoints_text({"subsets": [{"notReadyAddresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 80}]}]}) == "<none>"


def test_tables_pad_like_tabwriter():
    assert format_table([["NAME", "AGE"], ["a", "5s"]]) == "NAME   AGE\na      5s"
    pod = {"metadata": {"name": "echo-1", "namespace": "default", "creationTimestamp": "2025-01-01T00:00:00Z"},
           "spec": {"containers": [{"name": "c"}], "nodeName": "worker-1"},
           "status": {"phase": "Running", "podIP": "10.244.1.5",
                      "containerStatuses": [{"ready": True, "restartCount": 0}]}}
    now = datetime(2025, 1, 1, 0, 0, 30, tzinfo=timezone.utc)
    text = render(kinds.lookup("pods"), [pod], "wide", single=False, all_namespaces=False, now=now)
    assert text.splitlines() == [
        "NAME     READY   STATUS    RESTARTS   AGE   IP           NODE       NOMINATED NODE   READINESS GATES",
        "echo-1   1/1     Running   0          30s   10.244.1.5   worker-1   <none>           <none>"]


def test_get_several_kinds_and_apply_a_directory(api, tmp_path, capsys):
    folder = tmp_path / "manifests"
    folder.mkdir()
    write(folder, "app.yaml", GOOD)
    write(folder, "notes.txt", "not a manifest")
    assert netplane(apply_main, api, "-f", str(folder)) == 0
    assert capsys.readouterr().out == "deployment.apps/echo created\nservice/echo created\n"
    assert netplane(get_main, api, "svc,endpointslices") == 0
    tables = capsys.readouterr().out.split("\n\n")
    assert len(tables) == 2
    assert tables[0].splitlines()[1].startswith("service/echo ")
    assert tables[1].splitlines()[1].startswith("endpointslice.discovery.k8s.io/kubernetes ")
    assert netplane(get_main, api, "all", "-o", "name") == 0
    assert capsys.readouterr().out.splitlines() == [
        "service/echo", "service/kubernetes", "deployment.apps/echo"]
