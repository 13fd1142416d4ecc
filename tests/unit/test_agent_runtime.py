"""The agent's container runtime, pure parts: image -> argv, env, probes, restarts."""
from __future__ import annotations

import pytest

from netplane import runtime

ENTRY = ["/venv/bin/netplane"]
FACTS = runtime.PodFacts(pod_name="echo-1", namespace="shop", pod_ip="10.244.1.7", node_name="worker-1",
                         host_ip="192.168.56.11", server="http://192.168.56.10:6443")


def argv(container: dict, env: dict | None = None) -> list[str]:
    return runtime.container_argv(container, env or {}, entry=ENTRY)


@pytest.mark.parametrize("image, expected", [
    ("netplane/echo", ("netplane/echo", "latest")),
    ("netplane/echo:v2", ("netplane/echo", "v2")),
    ("docker.io/netplane/echo:v2", ("netplane/echo", "v2")),
    ("netplane/echo@sha256:abc", ("netplane/echo", "latest")),
    ("registry:5000/team/app:1.0", ("registry:5000/team/app", "1.0")),
    ("registry:5000/team/app", ("registry:5000/team/app", "latest")),
])
def test_image_repository(image, expected):
    assert runtime.image_repository(image) == expected


def test_echo_serves_its_container_ports_or_8080():
    assert argv({"image": "netplane/echo"}) == [*ENTRY, "echo", "--port", "8080"]
    assert argv({"image": "netplane/echo:v2", "ports": [{"containerPort": 80}, {"containerPort": 9000}]}) == \
        [*ENTRY, "echo", "--port", "80", "--port", "9000"]


def test_builtin_images_map_to_entry_points_and_args_append():
    assert argv({"image": "netplane/dns:1", "args": ["--listen", "0.0.0.0:53"]}) == \
        [*ENTRY, "dns", "serve", "--listen", "0.0.0.0:53"]
    assert argv({"image": "netplane/ingress"}) == [*ENTRY, "ingress", "serve"]


def test_command_replaces_the_entry_point_of_any_image():
    assert argv({"image": "busybox", "command": ["sleep"], "args": ["3600"]}) == ["sleep", "3600"]
    assert argv({"image": "netplane/echo", "command": ["sh", "-c", "exit 3"]}) == ["sh", "-c", "exit 3"]


def test_other_images_without_command_are_not_runnable_and_say_why():
    with pytest.raises(runtime.ImageNotRunnable, match=r"'nginx:1.25'.*netplane/echo.*command:"):
        argv({"image": "nginx:1.25"})


def test_var_expansion_in_command_and_args():
    env = {"POD_IP": "10.244.1.7"}
    assert argv({"image": "x", "command": ["echo", "$(POD_IP)", "$(NOPE)", "$$(POD_IP)"]}, env) == \
        ["echo", "10.244.1.7", "$(NOPE)", "$(POD_IP)"]


def test_env_has_pod_facts_then_spec_env_which_wins():
    container = {"image": "netplane/echo:v2", "ports": [{"containerPort": 80}, {"containerPort": 81}],
                 "env": [{"name": "GREETING", "value": "hi $(POD_NAME)"},
                         {"name": "NODE_NAME", "value": "override"},
                         {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                         {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}}]}
    pod = {"metadata": {"uid": "u1", "labels": {"app": "echo"}}}
    env = runtime.container_env(container, FACTS, pod, base={"PATH": "/usr/bin"})
    assert env == {
        "PATH": "/usr/bin", "POD_NAME": "echo-1", "POD_NAMESPACE": "shop", "POD_IP": "10.244.1.7",
        "NODE_NAME": "override", "NETPLANE_SERVER": "http://192.168.56.10:6443",
        "KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443",
        "NETPLANE_IMAGE": "netplane/echo:v2", "NETPLANE_CONTAINER_PORTS": "80,81",
        "GREETING": "hi echo-1", "MY_IP": "10.244.1.7", "APP": "echo"}


def test_process_argv_enters_netns_and_sets_hostname_without_a_shell_string_from_input():
    full = runtime.process_argv("np-pod-abc", "echo-1", ["/venv/bin/netplane", "echo", "--port", "8080"])
    assert full[:7] == ["ip", "netns", "exec", "np-pod-abc", "unshare", "--uts", "--"]
    assert full[7:10] == ["sh", "-c", 'hostname "$1" && shift && exec "$@"']
    assert full[10:] == ["netplane-pod", "echo-1", "/venv/bin/netplane", "echo", "--port", "8080"]


@pytest.mark.parametrize("policy, code, restart", [
    ("Always", 0, True), ("Always", 1, True), ("OnFailure", 0, False), ("OnFailure", 2, True),
    ("Never", 0, False), ("Never", 1, False), ("", 1, True)])
def test_should_restart(policy, code, restart):
    assert runtime.should_restart(policy, code) is restart


def test_backoff_doubles_and_caps():
    assert [runtime.backoff_delay(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert runtime.backoff_delay(30) == runtime.BACKOFF_MAX


def test_exit_code_of_a_signal_is_128_plus_signal():
    assert runtime.exit_code(-9) == 137 and runtime.exit_code(-15) == 143 and runtime.exit_code(3) == 3


def test_builtin_images_get_an_implicit_tcp_readiness_check_on_their_first_port():
    probe = runtime.readiness_probe({"image": "netplane/echo", "ports": [{"containerPort": 80}]})
    assert probe.kind == "tcp" and probe.port == 80 and probe.implicit
    assert runtime.readiness_probe({"image": "netplane/echo"}).port == 8080
    dns = {"image": "netplane/dns", "ports": [{"containerPort": 53, "protocol": "UDP"},
                                              {"containerPort": 5353, "protocol": "TCP"}]}
    assert runtime.readiness_probe(dns).port == 5353
    assert runtime.readiness_probe({"image": "netplane/dns", "ports": [{"containerPort": 53, "protocol": "UDP"}]}) is None
    assert runtime.readiness_probe({"image": "netplane/ingress"}) is None  # no port known: ready when running
    assert runtime.readiness_probe({"image": "busybox", "command": ["sleep", "1"]}) is None
    assert runtime.readiness_probe({"image": "netplane/echo", "command": ["sleep", "1"]}) is None


def test_readiness_probe_specs():
    container = {"name": "web", "ports": [{"name": "http", "containerPort": 8080}],
                 "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http",
                                                "httpHeaders": [{"name": "X-A", "value": "1"}]},
                                    "periodSeconds": 2, "initialDelaySeconds": 1, "failureThreshold": 5,
                                    "successThreshold": 2, "timeoutSeconds": 3}}
    probe = runtime.readiness_probe(container)
    assert probe == runtime.Probe(kind="http", port=8080, path="/healthz", headers=(("X-A", "1"),),
                                  initial_delay=1, period=2, timeout=3, success_threshold=2, failure_threshold=5)
    tcp = runtime.readiness_probe({"readinessProbe": {"tcpSocket": {"port": 53}}})
    assert (tcp.kind, tcp.port, tcp.period, tcp.failure_threshold) == ("tcp", 53, 10, 3)
    exe = runtime.readiness_probe({"readinessProbe": {"exec": {"command": ["test", "-f", "/tmp/ok"]}}})
    assert exe.command == ("test", "-f", "/tmp/ok")


@pytest.mark.parametrize("spec, message", [
    ({"httpGet": {"port": "nope"}}, "httpGet.port: 'nope'"),
    ({"exec": {"command": []}}, "exec.command"),
    ({"periodSeconds": 1}, "needs one of httpGet, tcpSocket, exec"),
])
def test_bad_probe_specs_name_the_field(spec, message):
    with pytest.raises(runtime.ProbeSpecError, match=message.replace("(", r"\(")):
        runtime.readiness_probe({"name": "c", "readinessProbe": spec})


def test_probe_tracker_thresholds():
    tracker = runtime.ProbeTracker(runtime.Probe(kind="tcp", success_threshold=2, failure_threshold=2))
    assert [tracker.record(ok) for ok in (True, True, False, True, False, False, True)] == \
        [False, True, False, False, False, True, False]
    assert tracker.ready is False
    assert tracker.record(True) is True and tracker.ready


def test_implicit_probe_polls_fast_until_first_ready():
    tracker = runtime.ProbeTracker(runtime.Probe(kind="tcp", port=80, period=2.0, implicit=True))
    assert tracker.next_delay() == 0.1
    tracker.record(True)
    assert tracker.next_delay() == 2.0


def test_liveness_probe_is_explicit_only_and_starts_alive():
    assert runtime.liveness_probe({"image": "netplane/echo"}) is None
    probe = runtime.liveness_probe({"name": "c", "livenessProbe": {"httpGet": {"path": "/", "port": 8080},
                                                                  "periodSeconds": 10, "initialDelaySeconds": 5}})
    assert (probe.kind, probe.port, probe.period, probe.initial_delay) == ("http", 8080, 10, 5)
    with pytest.raises(runtime.ProbeSpecError, match=r"containers\[c\]\.livenessProbe"):
        runtime.liveness_probe({"name": "c", "livenessProbe": {"periodSeconds": 1}})
    alive = runtime.ProbeTracker(probe, ready=True)
    assert [alive.record(ok) for ok in (False, False, True, False, False, False)] == \
        [False, False, False, False, False, True]
    assert alive.ready is False


def test_args_alone_are_the_command_for_an_image_we_do_not_run():
    assert runtime.container_argv({"image": "busybox", "args": ["sh", "-c", "echo $(X)"]}, {"X": "1"}) == \
        ["sh", "-c", "echo 1"]
    with pytest.raises(runtime.ImageNotRunnable, match="command: or args:"):
        runtime.container_argv({"image": "example.com/app:1"}, {})


def test_a_shell_image_with_nothing_to_run_runs_its_shell():   # kubectl debug -it pod --image=busybox
    for image in ("busybox", "busybox:1.36", "docker.io/library/alpine", "nicolaka/netshoot"):
        assert runtime.container_argv({"image": image}, {}) == ["sh"]
