"""Defaulting and validation: every error names its field, in Kubernetes' words."""
from __future__ import annotations

import copy

import pytest

from netplane.validation import default, format_errors, validate, validate_update


def fields(obj) -> list[str]:
    return [field for field, _ in validate(default(obj))]


def service(**spec):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
            "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80}], **spec}}


def deployment(replicas=3, selector=None, labels=None, containers=None):
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "echo"},
            "spec": {"replicas": replicas,
                     "selector": {"matchLabels": {"app": "echo"}} if selector is None else selector,
                     "template": {"metadata": {"labels": {"app": "echo"} if labels is None else labels},
                                  "spec": {"containers": containers if containers is not None else
                                           [{"name": "echo", "image": "netplane/echo"}]}}}}


def test_a_good_service_and_deployment_are_valid():
    assert validate(default(service())) == []
    assert validate(default(deployment())) == []


def test_service_without_ports_says_spec_ports_required():
    errors = validate(default(service(ports=[])))
    assert errors == [("spec.ports", "Required value")]
    assert format_errors(errors) == "spec.ports: Required value"
    assert fields(service(ports=None)) == ["spec.ports"]


def test_headless_and_external_name_services_need_no_ports():
    assert fields(service(ports=None, clusterIP="None")) == []
    assert fields(service(ports=None, type="ExternalName", externalName="example.com")) == []
    assert fields(service(ports=None, type="ExternalName")) == ["spec.externalName"]


@pytest.mark.parametrize("port, field", [
    ({"port": 0}, "spec.ports[0].port"),
    ({"port": 70000}, "spec.ports[0].port"),
    ({"port": "80"}, "spec.ports[0].port"),
    ({"port": 80, "protocol": "ICMP"}, "spec.ports[0].protocol"),
    ({"port": 80, "targetPort": 0}, "spec.ports[0].targetPort"),
    ({"port": 80, "targetPort": "Not_A_Name"}, "spec.ports[0].targetPort"),
    ({"port": 80, "targetPort": "a-very-long-port-name"}, "spec.ports[0].targetPort"),
    ({}, "spec.ports[0].port"),
])
def test_service_port_errors_name_the_port(port, field):
    assert fields(service(ports=[port]))[0] == field  # (a bad port also makes a bad default targetPort)


def test_named_and_string_target_ports_are_fine():
    assert fields(service(ports=[{"port": 80, "targetPort": "http"}])) == []
    assert fields(service(ports=[{"port": 80, "targetPort": "8080"}])) == []


def test_port_names_are_required_and_unique_when_there_are_several():
    assert fields(service(ports=[{"port": 80}, {"port": 81}])) == ["spec.ports[0].name", "spec.ports[1].name"]
    assert fields(service(ports=[{"port": 80, "name": "a"}, {"port": 81, "name": "a"}])) == ["spec.ports[1].name"]
    dns = service(ports=[{"port": 53, "name": "dns", "protocol": "UDP"},
                         {"port": 53, "name": "dns-tcp", "protocol": "TCP"}])
    assert fields(dns) == []


def test_service_type_must_be_known():
    errors = validate(default(service(type="Magic")))
    assert errors[0][0] == "spec.type"
    assert '"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"' in errors[0][1]


def test_service_names_are_dns_1035_labels():
    bad = service()
    bad["metadata"]["name"] = "1echo"
    assert fields(bad) == ["metadata.name"]
    bad["metadata"]["name"] = "Echo"
    assert fields(bad) == ["metadata.name"]


def test_metadata_name_is_required_unless_generate_name_is_given():
    obj = deployment()
    del obj["metadata"]["name"]
    assert validate(default(obj)) == [("metadata.name", "Required value")]
    obj["metadata"]["generateName"] = "echo-"
    assert validate(default(obj)) == []
    obj["metadata"]["name"] = "bad_name"
    assert fields(obj) == ["metadata.name"]


def test_labels_must_be_valid():
    obj = service()
    obj["metadata"]["labels"] = {"app": "has space"}
    assert fields(obj) == ["metadata.labels[app]"]


def test_deployment_selector_must_exist_and_match_the_template():
    assert fields(deployment(selector={})) == ["spec.selector"]
    errors = validate(default(deployment(labels={"app": "other"})))
    assert errors[0][0] == "spec.template.metadata.labels"
    assert "`selector` does not match template `labels`" in errors[0][1]


def test_deployment_replicas_and_containers():
    errors = validate(default(deployment(replicas=-1)))
    assert errors == [("spec.replicas", "Invalid value: -1: must be greater than or equal to 0")]
    assert fields(deployment(containers=[])) == ["spec.template.spec.containers"]
    assert fields(deployment(containers=[{"name": "echo"}])) == ["spec.template.spec.containers[0].image"]
    assert fields(deployment(containers=[{"image": "x"}])) == ["spec.template.spec.containers[0].name"]


def test_pod_needs_containers_with_name_and_image():
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "a", "image": "netplane/echo",
                                    "ports": [{"containerPort": 99999}]}]}}
    assert fields(pod) == ["spec.containers[0].ports[0].containerPort"]
    pod["spec"] = {}
    assert fields(pod) == ["spec.containers"]
    del pod["spec"]
    assert fields(pod) == ["spec"]


def ingress(paths):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "web"},
            "spec": {"rules": [{"host": "echo.lab", "http": {"paths": paths}}]}}


def test_ingress_paths_need_a_path_type_and_a_backend():
    good = {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "echo", "port": {"number": 80}}}}
    assert fields(ingress([good])) == []
    assert fields(ingress([{**good, "pathType": "Regex"}])) == ["spec.rules[0].http.paths[0].pathType"]
    no_type = {k: v for k, v in good.items() if k != "pathType"}
    assert fields(ingress([no_type])) == ["spec.rules[0].http.paths[0].pathType"]
    assert fields(ingress([{**good, "backend": {"service": {"port": {"number": 80}}}}])) == \
        ["spec.rules[0].http.paths[0].backend.service.name"]
    assert fields(ingress([{**good, "backend": {"service": {"name": "echo"}}}])) == \
        ["spec.rules[0].http.paths[0].backend.service.port"]
    assert fields(ingress([{**good, "path": "relative"}])) == ["spec.rules[0].http.paths[0].path"]


@pytest.mark.parametrize("path_type,path,message", [
    ("Prefix", "/a//b", "must not contain '//'"), ("Exact", "/a/./b", "must not contain '/./'"),
    ("Prefix", "/a/../b", "must not contain '/../'"), ("Prefix", "/a%2fb", "must not contain '%2f'"),
    ("Exact", "/a%2Fb", "must not contain '%2F'"), ("Prefix", "/a/..", "cannot end with '/..'"),
    ("Exact", "/a/.", "cannot end with '/.'"), ("ImplementationSpecific", "relative", "must be an absolute path")])
def test_ingress_paths_that_spell_one_path_as_another_are_refused_in_kubernetes_words(path_type, path, message):
    item = {"path": path, "pathType": path_type, "backend": {"service": {"name": "echo", "port": {"number": 80}}}}
    errors = validate(default(ingress([item])))
    assert [f for f, _ in errors] == ["spec.rules[0].http.paths[0].path"] and message in errors[0][1], errors


def test_implementation_specific_paths_may_hold_what_exact_and_prefix_may_not():
    item = {"path": "/a//b/..", "pathType": "ImplementationSpecific",
            "backend": {"service": {"name": "echo", "port": {"number": 80}}}}
    assert fields(ingress([item])) == []


def test_endpointslice_needs_an_address_type_and_addresses():
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "e"},
           "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.1.5"]}], "ports": [{"port": 8080}]}
    assert fields(eps) == []
    assert fields({**eps, "addressType": None}) == ["addressType"]
    assert fields({**eps, "endpoints": [{"addresses": []}]}) == ["endpoints[0].addresses"]
    assert fields({**eps, "endpoints": [{"addresses": ["fe80::1"]}]}) == ["endpoints[0].addresses[0]"]


def test_endpoints_need_ips_and_ports():
    eps = {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "db"},
           "subsets": [{"addresses": [{"ip": "192.0.2.10"}, {"ip": "2001:db8::1"}], "ports": [{"port": 5432}]}]}
    assert fields(eps) == []
    assert default(eps)["subsets"][0]["ports"][0]["protocol"] == "TCP"
    bad = {**eps, "subsets": [{"addresses": [{"ip": "db.example"}, {}], "notReadyAddresses": [{"ip": "10.0.0.300"}],
                               "ports": [{"port": 0}, {"port": 80, "protocol": "ICMP"}]}]}
    assert fields(bad) == ["subsets[0].addresses[0].ip", "subsets[0].addresses[1].ip",
                           "subsets[0].notReadyAddresses[0].ip", "subsets[0].ports[0].port",
                           "subsets[0].ports[1].protocol"]


def test_defaults_fill_the_usual_fields_and_are_idempotent():
    svc = default(service(ports=[{"port": 80}]))
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["sessionAffinity"] == "None"
    assert svc["spec"]["ports"][0] == {"port": 80, "protocol": "TCP", "targetPort": 80}
    dep = default({**deployment(), "spec": {k: v for k, v in deployment()["spec"].items() if k != "replicas"}})
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["template"]["spec"]["restartPolicy"] == "Always"
    pod = default({"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}})
    assert pod["spec"]["restartPolicy"] == "Always"
    for obj in (svc, dep, pod):
        assert default(obj) == obj


def test_default_does_not_touch_its_input():
    original = service(ports=[{"port": 80}])
    snapshot = copy.deepcopy(original)
    default(original)
    assert original == snapshot


def test_immutable_fields_on_update():
    old = default(service(clusterIP="10.96.1.1"))
    assert validate_update(old, default(service(clusterIP="10.96.1.2")))[0][0] == "spec.clusterIP"
    assert validate_update(old, default(service(clusterIP="10.96.1.1"))) == []
    assert validate_update(default(deployment()), default(deployment(selector={"matchLabels": {"app": "x"}},
                                                                      labels={"app": "x"})))[0][0] == "spec.selector"
    pod = {"kind": "Pod", "spec": {"nodeName": "worker-1"}}
    assert validate_update(pod, {"kind": "Pod", "spec": {"nodeName": "worker-2"}})[0][0] == "spec.nodeName"
    node = {"kind": "Node", "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]}}
    moved = {"kind": "Node", "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]}}
    assert [f for f, _ in validate_update(node, moved)] == ["spec.podCIDR", "spec.podCIDRs"]
    assert validate_update({"kind": "Node", "spec": {}}, moved) == []   # from "" to valid: allowed
    assert validate_update(node, node) == []


def pod(**spec):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "netplane/echo"}], **spec}}


@pytest.mark.parametrize("spec,field", [
    ({"dnsPolicy": "Cluster"}, "spec.dnsPolicy"),
    ({"dnsPolicy": "None"}, "spec.dnsConfig"),
    ({"dnsPolicy": "None", "dnsConfig": {"searches": ["a.example"]}}, "spec.dnsConfig.nameservers"),
    ({"dnsConfig": {"nameservers": ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]}}, "spec.dnsConfig.nameservers"),
    ({"dnsConfig": {"nameservers": ["not-an-ip"]}}, "spec.dnsConfig.nameservers[0]"),
    ({"dnsConfig": {"searches": ["Bad_Domain"]}}, "spec.dnsConfig.searches[0]"),
    ({"dnsConfig": {"options": [{"value": "2"}]}}, "spec.dnsConfig.options[0].name"),
    ({"dnsConfig": "8.8.8.8"}, "spec.dnsConfig"),
])
def test_dns_policy_and_config_are_checked_as_kubernetes_does(spec, field):
    assert fields(pod(**spec)) == [field]


def test_good_dns_settings_are_valid():
    assert fields(pod(dnsPolicy="None", dnsConfig={"nameservers": ["10.96.0.10"], "searches": ["svc.cluster.local."],
                                                   "options": [{"name": "ndots", "value": "2"}]})) == []
    assert fields(pod(dnsPolicy="Default")) == [] and fields(pod(dnsPolicy="ClusterFirstWithHostNet")) == []
