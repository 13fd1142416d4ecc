"""The route table (pure): the Kubernetes docs' example table, the conformance scenarios, precedence,
default backend, 404/503, backend ports, IngressClass selection and TLS certificates by host."""
from __future__ import annotations

import base64

import pytest

from netplane.ingress.routes import (ClassPolicy, Endpoint, Objects, build_table, normalise_host,
                                     normalise_path, prefix_matches)


# ------------------------------------------------------------------------------ object builders

def service(name, ports=(("http", 80, 8080),), ns="default"):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"ports": [{"name": n, "port": p, "targetPort": t} for n, p, t in ports]}}


def endpoint_slice(svc, addresses, ports=(("http", 8080),), ns="default", not_ready=()):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{svc}-abc", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc}},
            "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
            "endpoints": [{"addresses": [a], "conditions": {"ready": a not in not_ready}}
                          for a in addresses]}


def backend(svc, port=80):
    key = "number" if isinstance(port, int) else "name"
    return {"service": {"name": svc, "port": {key: port}}}


def path(p, svc, path_type="Prefix", port=80):
    return {"path": p, "pathType": path_type, "backend": backend(svc, port)}


def ingress(name, rules=(), default=None, created="2024-01-01T00:00:00Z", class_name="netplane",
            annotations=None, tls=None, ns="default"):
    spec = {"rules": [{**({"host": h} if h else {}), "http": {"paths": list(ps)}} for h, ps in rules]}
    if class_name:
        spec["ingressClassName"] = class_name
    if default:
        spec["defaultBackend"] = backend(default)
    if tls:
        spec["tls"] = tls
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": created,
                         "annotations": annotations or {}},
            "spec": spec}


def world(ingresses, svc_names, extra=()):
    """Ingresses plus a ready Service (one endpoint each, address derived from the name) per name."""
    objs = list(ingresses) + list(extra)
    for i, name in enumerate(svc_names):
        objs += [service(name), endpoint_slice(name, [f"10.0.0.{i + 1}"])]
    return Objects.from_list(objs)


def served_by(table, host, p):
    """The Service that answers (its name), or the status code as an int."""
    route = table.route(host, p)
    if route.backend is None:
        return route.status
    if not route.backend.usable:
        return 503
    return route.backend.service.split("/")[1].split(":")[0]


# ------------------------------------------------------------------------------ docs example table

DOCS_TABLE = [
    # (rules as (path, type, service)), request path, expected service or 404 (no default backend)
    ([("/", "Prefix", "root")], "/anything/at/all", "root"),
    ([("/foo", "Exact", "foo")], "/foo", "foo"),
    ([("/foo", "Exact", "foo")], "/bar", 404),
    ([("/foo", "Exact", "foo")], "/foo/", 404),
    ([("/foo/", "Exact", "foo")], "/foo", 404),
    ([("/foo", "Prefix", "foo")], "/foo", "foo"),
    ([("/foo", "Prefix", "foo")], "/foo/", "foo"),
    ([("/foo/", "Prefix", "foo")], "/foo", "foo"),
    ([("/foo/", "Prefix", "foo")], "/foo/", "foo"),
    ([("/aaa/bb", "Prefix", "a")], "/aaa/bbb", 404),
    ([("/aaa/bbb", "Prefix", "a")], "/aaa/bbb", "a"),
    ([("/aaa/bbb/", "Prefix", "a")], "/aaa/bbb", "a"),
    ([("/aaa/bbb", "Prefix", "a")], "/aaa/bbb/", "a"),
    ([("/aaa/bbb", "Prefix", "a")], "/aaa/bbb/ccc", "a"),
    ([("/aaa/bbb", "Prefix", "a")], "/aaa/bbbxyz", 404),
    ([("/", "Prefix", "root"), ("/aaa", "Prefix", "aaa")], "/aaa/ccc", "aaa"),
    ([("/", "Prefix", "root"), ("/aaa", "Prefix", "aaa"), ("/aaa/bbb", "Prefix", "bbb")], "/aaa/bbb", "bbb"),
    ([("/", "Prefix", "root"), ("/aaa", "Prefix", "aaa"), ("/aaa/bbb", "Prefix", "bbb")], "/ccc", "root"),
    ([("/aaa", "Prefix", "aaa")], "/ccc", 404),
    ([("/foo", "Prefix", "prefix"), ("/foo", "Exact", "exact")], "/foo", "exact"),
    ([("/foo", "Exact", "exact"), ("/foo", "Prefix", "prefix")], "/foo", "exact"),
    ([("/foo", "ImplementationSpecific", "impl")], "/foo/bar", "impl"),
    # ImplementationSpecific: a plain string prefix (ingress-nginx's reading), longest match first
    ([("/foo", "ImplementationSpecific", "impl")], "/foobar", "impl"),
    ([("/foo", "ImplementationSpecific", "impl")], "/fo", 404),
    ([("/foo", "Prefix", "prefix"), ("/foo/ba", "ImplementationSpecific", "impl")], "/foo/bar", "impl"),
    ([("/foo/bar", "Prefix", "prefix"), ("/foo/ba", "ImplementationSpecific", "impl")], "/foo/bar", "prefix"),
    ([("/foo", "Prefix", "prefix"), ("/foo", "ImplementationSpecific", "impl")], "/foo/x", "prefix"),
    ([("/foo", "Exact", "exact"), ("/f", "ImplementationSpecific", "impl")], "/foo", "exact"),
    ([("/", "ImplementationSpecific", "impl"), ("/api", "Prefix", "api")], "/apix", "impl"),
]


@pytest.mark.parametrize("rules,request_path,expected", DOCS_TABLE)
def test_docs_example_table(rules, request_path, expected):
    paths = [path(p, svc, t) for p, t, svc in rules]
    table = build_table(world([ingress("ing", [(None, paths)])], {svc for _, _, svc in rules}))
    assert served_by(table, "any.host", request_path) == expected


@pytest.mark.parametrize("rule,request_path,expected", [
    ("/", "/x", True), ("/foo", "/foo", True), ("/foo", "/foo/", True), ("/foo/", "/foo", True),
    ("/foo", "/foobar", False), ("/aaa/bbb", "/aaa/bbb/ccc", True), ("/aaa/bb", "/aaa/bbb", False),
])
def test_prefix_rule_alone(rule, request_path, expected):
    assert prefix_matches(rule, request_path) is expected


def test_query_is_not_part_of_the_path_the_shell_passes():
    # the shell passes the path before '?': the table sees '/foo'
    table = build_table(world([ingress("ing", [(None, [path("/foo", "foo", "Exact")])])], ["foo"]))
    assert served_by(table, "h", "/foo") == "foo"


@pytest.mark.parametrize("raw,matched", [
    ("/", "/"), ("/foo", "/foo"), ("/foo/", "/foo/"), ("/a/./b/../c", "/a/c"), ("/a/b/c/./../../g", "/a/g"),
    ("//a//b", "/a/b"), ("/a/..", "/"), ("/..", "/"), ("/../../x", "/x"), ("/a/.", "/a/"), ("/.well-known/x", "/.well-known/x"),
    ("/%61pi/%7Euser", "/api/~user"), ("/a/%2e%2e/b", "/b"), ("/a%2fb", "/a%2Fb"), ("/a%2Fb/../c", "/c"),
    ("/caf%C3%A9", "/caf%C3%A9"), ("/x#frag", "/x"), ("*", "*")])
def test_request_paths_are_matched_normalised(raw, matched):
    assert normalise_path(raw) == matched


def test_a_backend_is_not_reached_outside_its_paths_by_spelling():
    table = build_table(world([ingress("ing", [("h", [path("/api", "api"), path("/", "web"),
                                                      path("/admin", "admin", "Exact")])])], ["api", "web", "admin"]))
    assert served_by(table, "h", "/api/../secret") == "web"    # a backend resolving '..' would serve /secret
    assert served_by(table, "h", "/api/%2e%2e/secret") == "web"
    assert served_by(table, "h", "/static//api/x") == "web"
    assert served_by(table, "h", "//api//v1") == "api"
    assert served_by(table, "h", "/x/../admin") == "admin"
    assert served_by(table, "h", "/%61pi") == "api"
    assert served_by(table, "h", "/api%2Fx") == "web"         # an encoded '/' separates no segments


def test_rules_are_normalised_like_requests_and_ones_the_api_refuses_are_skipped():
    table = build_table(world([ingress("ing", [("h", [path("/%61pi", "api"), path("/a//b", "web"),
                                                      path("/x/..", "web", "Exact")])])], ["api", "web"]))
    assert served_by(table, "h", "/api/v1") == "api"
    assert served_by(table, "h", "/a/b") == 404
    assert [p for p in table.problems if "paths[1].path" in p and "must not contain '//'" in p]
    assert [p for p in table.problems if "paths[2].path" in p and "cannot end with '/..'" in p]


# ------------------------------------------------------------------------------ conformance scenarios

def conformance_path_world():
    ing = ingress("path-rules", [
        ("exact-path-rules", [path("/foo", "foo-exact", "Exact")]),
        ("prefix-path-rules", [path("/foo", "foo-prefix"), path("/aaa/bbb", "aaa-slash-bbb-prefix"),
                               path("/aaa", "aaa-prefix")]),
        ("mixed-path-rules", [path("/foo", "foo-prefix"), path("/foo", "foo-exact", "Exact")]),
        ("trailing-slash-path-rules", [path("/aaa/bbb/", "aaa-slash-bbb-slash-prefix"),
                                       path("/foo/", "foo-slash-exact", "Exact")]),
    ])
    return build_table(world([ing], ["foo-exact", "foo-prefix", "aaa-slash-bbb-prefix", "aaa-prefix",
                                     "aaa-slash-bbb-slash-prefix", "foo-slash-exact"]))


@pytest.mark.parametrize("host,request_path,expected", [
    ("exact-path-rules", "/foo", "foo-exact"),
    ("exact-path-rules", "/foo/", 404),
    ("exact-path-rules", "/FOO", 404),
    ("exact-path-rules", "/bar", 404),
    ("prefix-path-rules", "/foo", "foo-prefix"),
    ("prefix-path-rules", "/foo/", "foo-prefix"),
    ("prefix-path-rules", "/FOO", 404),
    ("prefix-path-rules", "/aaa/bbb", "aaa-slash-bbb-prefix"),
    ("prefix-path-rules", "/aaa/bbb/ccc", "aaa-slash-bbb-prefix"),
    ("prefix-path-rules", "/aaa/ccc", "aaa-prefix"),
    ("prefix-path-rules", "/aaaccc", 404),
    ("mixed-path-rules", "/foo", "foo-exact"),
    ("mixed-path-rules", "/foo/x", "foo-prefix"),
    ("trailing-slash-path-rules", "/aaa/bbb", "aaa-slash-bbb-slash-prefix"),
    ("trailing-slash-path-rules", "/aaa/bbb/", "aaa-slash-bbb-slash-prefix"),
    ("trailing-slash-path-rules", "/foo", 404),
    ("trailing-slash-path-rules", "/foo/", "foo-slash-exact"),
])
def test_conformance_path_rules(host, request_path, expected):
    assert served_by(conformance_path_world(), host, request_path) == expected


def conformance_host_world():
    ing = ingress("host-rules", [
        ("*.foo.com", [path("/", "wildcard-foo-com", port=8080)]),
        ("foo.bar.com", [path("/", "foo-bar-com", port="http")]),
    ])
    objs = [ing, service("wildcard-foo-com", [("", 8080, 80)]), endpoint_slice("wildcard-foo-com", ["10.0.1.1"], [("", 80)]),
            service("foo-bar-com", [("http", 80, 8080)]), endpoint_slice("foo-bar-com", ["10.0.2.1"])]
    return build_table(Objects.from_list(objs))


@pytest.mark.parametrize("host,expected", [
    ("foo.bar.com", "foo-bar-com"),
    ("FOO.bar.com:8080", "foo-bar-com"),        # port stripped, case folded
    ("foo.bar.com.", "foo-bar-com"),            # one trailing dot stripped
    ("subdomain.bar.com", 404),
    ("bar.foo.com", "wildcard-foo-com"),
    ("bar.foo.com:1234", "wildcard-foo-com"),
    ("baz.bar.foo.com", 404),                   # wildcard covers exactly one label
    ("foo.com", 404),
])
def test_conformance_host_rules(host, expected):
    assert served_by(conformance_host_world(), host, "/") == expected


def test_backend_ports_resolve_by_number_and_by_name_to_the_endpoint_port():
    table = conformance_host_world()
    assert table.route("bar.foo.com", "/").backend.endpoints == (Endpoint("10.0.1.1", 80),)
    assert table.route("foo.bar.com", "/").backend.endpoints == (Endpoint("10.0.2.1", 8080),)


def test_conformance_default_backend_takes_any_host_and_method():
    table = build_table(world([ingress("default-backend", default="echo-service")], ["echo-service"]))
    for host in ("my-host", "some-host", "", "x.y.z"):
        assert served_by(table, host, "/sub-path") == "echo-service"


# ------------------------------------------------------------------------------ precedence

def test_exact_host_beats_wildcard_beats_hostless_without_fall_through():
    table = build_table(world([ingress("i", [
        ("a.example.com", [path("/only", "exact-host")]),
        ("*.example.com", [path("/", "wildcard")]),
        (None, [path("/", "catch-all")]),
    ])], ["exact-host", "wildcard", "catch-all"]))
    assert served_by(table, "a.example.com", "/only/x") == "exact-host"
    assert served_by(table, "a.example.com", "/other") == 404      # the precise host decides
    assert served_by(table, "b.example.com", "/other") == "wildcard"
    assert served_by(table, "elsewhere.org", "/other") == "catch-all"


def test_no_match_in_a_host_goes_to_the_default_backend():
    table = build_table(world([ingress("i", [("a.example.com", [path("/api", "api")])], default="fallback")],
                              ["api", "fallback"]))
    assert served_by(table, "a.example.com", "/web") == "fallback"
    assert served_by(table, "b.example.com", "/api") == "fallback"


def test_oldest_ingress_wins_a_tie_and_the_oldest_default_backend_is_used():
    old = ingress("zzz-old", [("h", [path("/x", "old")])], default="old", created="2020-01-01T00:00:00Z")
    new = ingress("aaa-new", [("h", [path("/x", "new")])], default="new", created="2023-01-01T00:00:00Z")
    table = build_table(world([new, old], ["old", "new"]))
    assert served_by(table, "h", "/x") == "old"
    assert served_by(table, "other", "/") == "old"
    route = table.route("h", "/x")
    assert route.ingress == "default/zzz-old" and route.path == "/x"


def test_paths_from_several_ingresses_for_one_host_merge_and_longest_wins():
    a = ingress("a", [("h", [path("/", "root")])], created="2020-01-01T00:00:00Z")
    b = ingress("b", [("h", [path("/api", "api")])], created="2023-01-01T00:00:00Z")
    table = build_table(world([a, b], ["root", "api"]))
    assert served_by(table, "h", "/api/v1") == "api"
    assert served_by(table, "h", "/apiv1") == "root"


def test_longer_written_prefix_wins_for_the_same_normalised_path():
    table = build_table(world([ingress("i", [("h", [path("/foo", "short"), path("/foo/", "long")])])],
                              ["short", "long"]))
    assert served_by(table, "h", "/foo") == "long"


# ------------------------------------------------------------------------------ 503, never fall through

def test_missing_service_or_no_ready_endpoints_is_503_not_a_shorter_path():
    objs = [ingress("i", [("h", [path("/", "root"), path("/gone", "missing"), path("/down", "down"),
                                 path("/badport", "root", port=9999)])]),
            service("root"), endpoint_slice("root", ["10.0.0.1"]),
            service("down"), endpoint_slice("down", ["10.0.0.2"], not_ready=("10.0.0.2",))]
    table = build_table(Objects.from_list(objs))
    for p, why in (("/gone/x", "not found"), ("/down", "no ready endpoints"), ("/badport", "no port 9999")):
        route = table.route("h", p)
        assert not route.backend.usable and why in route.backend.problem, (p, route)
    assert served_by(table, "h", "/ok") == "root"


def test_not_ready_endpoints_are_left_out_and_slices_are_merged():
    objs = [ingress("i", [(None, [path("/", "s")])]), service("s"),
            endpoint_slice("s", ["10.0.0.1", "10.0.0.2"], not_ready=("10.0.0.2",)),
            {**endpoint_slice("s", ["10.0.0.3"]), "metadata": {"name": "s-2", "namespace": "default",
                                                               "labels": {"kubernetes.io/service-name": "s"}}}]
    table = build_table(Objects.from_list(objs))
    assert table.route("x", "/").backend.endpoints == (Endpoint("10.0.0.1", 8080), Endpoint("10.0.0.3", 8080))


def test_services_are_looked_up_in_the_ingress_namespace():
    objs = [ingress("i", [(None, [path("/", "s")])], ns="team"), service("s"), endpoint_slice("s", ["10.0.0.1"])]
    route = build_table(Objects.from_list(objs)).route("x", "/")
    assert route.backend.problem == "service team/s not found"


def test_bad_rules_are_skipped_with_a_reason_naming_the_field():
    bad = ingress("bad", [("h", [path("nope", "s"), path("/x", "s", "Regex"), path("/ok", "s")])])
    table = build_table(world([bad], ["s"]))
    assert served_by(table, "h", "/ok") == "s"
    assert any("spec.rules[0].http.paths[0].path" in p for p in table.problems)
    assert any("spec.rules[0].http.paths[1].pathType" in p for p in table.problems)


# ------------------------------------------------------------------------------ IngressClass

def ingress_class(name, controller, default=False):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
            "metadata": {"name": name, "annotations": (
                {"ingressclass.kubernetes.io/is-default-class": "true"} if default else {})},
            "spec": {"controller": controller}}


def class_world(classes, **ingress_kwargs):
    return build_table(world([ingress("i", [("h", [path("/", "s")])], **ingress_kwargs)], ["s"],
                             extra=classes))


@pytest.mark.parametrize("classes,kwargs,ours", [
    ([], {"class_name": "netplane"}, True),
    ([], {"class_name": None}, True),                                    # no class, no default: ours
    ([], {"class_name": "some-invalid-class-name"}, False),
    ([ingress_class("other", "example.com/other", default=True)], {"class_name": None}, False),
    ([ingress_class("netplane", "netplane.io/ingress", default=True)], {"class_name": None}, True),
    ([ingress_class("public", "netplane.io/ingress")], {"class_name": "public"}, True),  # by controller
    ([], {"class_name": None, "annotations": {"kubernetes.io/ingress.class": "netplane"}}, True),
    ([], {"class_name": None, "annotations": {"kubernetes.io/ingress.class": "nginx"}}, False),
    ([ingress_class("netplane", "example.com/other")], {"class_name": "netplane"}, False),
])
def test_ingress_class_selects_our_ingresses(classes, kwargs, ours):
    table = class_world(classes, **kwargs)
    assert (served_by(table, "h", "/") == "s") is ours
    assert (table.ingresses == ("default/i",)) is ours


def test_class_policy_can_be_renamed():
    table = build_table(world([ingress("i", [("h", [path("/", "s")])], class_name="edge")], ["s"]),
                        ClassPolicy(class_name="edge"))
    assert served_by(table, "h", "/") == "s"


# ------------------------------------------------------------------------------ TLS certificates

def tls_secret(name, cert=b"CERT", key=b"KEY"):
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": name, "namespace": "default"},
            "data": {"tls.crt": base64.b64encode(cert).decode(), "tls.key": base64.b64encode(key).decode()}}


def test_certificates_by_host_exact_then_wildcard():
    ing = ingress("i", [("a.test", [path("/", "s")])], tls=[
        {"hosts": ["a.test"], "secretName": "a"}, {"hosts": ["*.wild.test"], "secretName": "w"},
        {"hosts": ["b.test"], "secretName": "missing"}])
    table = build_table(world([ing], ["s"], extra=[tls_secret("a", b"A"), tls_secret("w", b"W")]))
    assert table.certificate_for("a.test").cert_pem == b"A"
    assert table.certificate_for("x.wild.test").cert_pem == b"W"
    assert table.certificate_for("x.y.wild.test") is None
    assert table.certificate_for("b.test") is None
    assert any("secret default/missing not found" in p for p in table.problems)


@pytest.mark.parametrize("raw,host", [("Foo.COM:8080", "foo.com"), ("[::1]:80", "[::1]"),
                                      ("foo.com.", "foo.com"), ("", "")])
def test_normalise_host(raw, host):
    assert normalise_host(raw) == host


# ------------------------------------------------------------------------------ the proxy's route cache

def test_proxy_route_cache_answers_like_the_table_and_follows_a_swap():
    import asyncio

    from netplane.ingress.proxy import Proxy, Settings

    before = build_table(world([ingress("i", [("h", [path("/", "old")])])], ["old"]))
    after = build_table(world([ingress("i", [("h", [path("/", "new"), path("/x", "x")])])], ["new", "x"]))

    async def lookups():
        proxy = Proxy(before, Settings(access_log=False))
        first = [proxy.route(b"H:80", b"/x/1"), proxy.route(b"h", b"/x/1"), proxy.route(b"other", b"/")]
        cached = proxy.route(b"h", b"/x/1")
        proxy.swap_table(after)
        return first, cached, [proxy.route(b"h", b"/x/1"), proxy.route(b"h", b"/y")]

    first, cached, swapped = asyncio.run(lookups())
    assert [r.backend.service if r.backend else r.status for r in first] == [
        "default/old:80", "default/old:80", 404]
    assert cached is first[1]
    assert [r.backend.service for r in swapped] == ["default/x:80", "default/new:80"]



def test_published_status_puts_our_services_addresses_on_the_ingresses_we_serve():
    from netplane.ingress.routes import published_status
    service = {"status": {"loadBalancer": {"ingress": [{"ip": "192.168.56.200", "ipMode": "VIP"}]}}}
    ours = ingress("ours", [("h", [path("/", "s")])])
    already = {**ingress("already", [("h2", [path("/", "s")])]),
               "status": {"loadBalancer": {"ingress": [{"ip": "192.168.56.200"}]}}}
    theirs = ingress("theirs", [("h3", [path("/", "s")])], class_name="other")
    served = ["default/ours", "default/already"]
    assert published_status([ours, already, theirs], served, service) == [
        ("default", "ours", {"loadBalancer": {"ingress": [{"ip": "192.168.56.200"}]}})]
    assert published_status([ours], served, {"status": {"loadBalancer": {}}}) == []   # no address yet
    assert published_status([ours], served, None) == []


def test_only_the_first_worker_publishes_ingress_status():
    from netplane.ingress.workers import without_publishing, worker_argv
    argv = worker_argv(["serve", "--listen", "0.0.0.0:80", "--workers", "2", "--publish-service", "ns/svc",
                        "--health-listen", "0.0.0.0:10254"])
    assert argv == ["--listen", "0.0.0.0:80", "--publish-service", "ns/svc"]
    assert without_publishing(argv) == ["--listen", "0.0.0.0:80"]
    assert without_publishing(["--publish-service=ns/svc", "--no-access-log"]) == ["--no-access-log"]
