"""The echo image's pure parts: the answer text reads back as YAML with the same strings; ports."""
from __future__ import annotations

import asyncio

import pytest
import yaml

from netplane import echo

FACTS = echo.PodFacts(pod="echo-7d4f-abc", namespace="default", pod_ip="10.244.1.5",
                      node="worker-1", image="netplane/echo:v2")


@pytest.mark.parametrize("value", [
    "10.244.1.5", "10.244.1.1:43210", "[fd00::1]:8080", "8080", "1.5", "1:20", "12:30:45",
    "2024-01-01", "yes", "No", "true", "null", "~", "", "/", "/a/b?x=1&y=2", "/x?y: z", "#c",
    "a #b", "- x", "echo.default.svc.cluster.local", "host:8080", ".inf", "0x1f", "0o17", "1e5",
    "*star", "&anchor", "!tag", "'q'", '"dq"', "a\tb", "é", "GET", "worker-1",
])
def test_yaml_scalar_reads_back_as_the_same_string(value):
    assert yaml.safe_load(f"key: {echo.yaml_scalar(value)}\n") == {"key": value}


@pytest.mark.parametrize("value", ["10.244.1.5", "10.244.1.1:43210", "/a/b", "worker-1",
                                   "netplane/echo:v2", "echo.default.svc:8080", "/a?b=1"])
def test_yaml_scalar_keeps_everyday_values_plain_for_curl(value):
    assert echo.yaml_scalar(value) == value


def test_answer_body_is_yaml_with_every_field():
    body = echo.answer_body(FACTS, client="10.244.2.1:40000", host="echo.default.svc", method="GET",
                            path="/hello?x: y")
    assert yaml.safe_load(body) == {
        "pod": "echo-7d4f-abc", "namespace": "default", "pod_ip": "10.244.1.5", "node": "worker-1",
        "image": "netplane/echo:v2", "client": "10.244.2.1:40000", "host": "echo.default.svc",
        "method": "GET", "path": "/hello?x: y"}
    assert body.startswith(b"pod: echo-7d4f-abc\n")


def test_format_address_brackets_ipv6():
    assert echo.format_address("10.0.0.1", 80) == "10.0.0.1:80"
    assert echo.format_address("fd00::1", 80) == "[fd00::1]:80"


def test_response_has_length_and_connection_header():
    raw = echo.response_bytes("200 OK", b"ok\n", keep_alive=True)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert body == b"ok\n"
    assert b"Content-Length: 3" in head and b"Connection: keep-alive" in head
    head_only = echo.response_bytes("200 OK", b"ok\n", keep_alive=False, head=True)
    assert head_only.endswith(b"\r\n\r\n") and b"Connection: close" in head_only


def test_ports_flags_then_env_then_default():
    assert echo.ports_from([80, 81, 80], {"NETPLANE_CONTAINER_PORTS": "9000"}) == [80, 81]
    assert echo.ports_from(None, {"NETPLANE_CONTAINER_PORTS": "9000,9001"}) == [9000, 9001]
    assert echo.ports_from(None, {"NETPLANE_CONTAINER_PORTS": ""}) == [8080]
    assert echo.ports_from([], {}) == [8080]


def test_facts_from_env():
    facts = echo.PodFacts.from_env({"POD_NAME": "p", "POD_NAMESPACE": "ns", "POD_IP": "10.0.0.2",
                                    "NODE_NAME": "n", "NETPLANE_IMAGE": "netplane/echo:1"})
    assert facts == echo.PodFacts("p", "ns", "10.0.0.2", "n", "netplane/echo:1")


def test_bad_port_is_named():
    with pytest.raises(SystemExit):
        echo.parse_args(["--port", "70000"])


class FakeTransport:
    def __init__(self):
        self.written = b""
        self.closed = False

    def get_extra_info(self, name):
        return ("10.244.2.7", 51000) if name == "peername" else None

    def write(self, data):
        self.written += data

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True


def test_protocol_answers_pipelined_requests_in_order_and_honours_close():
    proto = echo.EchoProtocol(FACTS)
    transport = FakeTransport()
    proto.connection_made(transport)
    proto.data_received(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
                        b"POST /two HTTP/1.1\r\nHost: b\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc")
    responses = transport.written.split(b"HTTP/1.1 200 OK")[1:]
    assert len(responses) == 3
    assert b"path: /one" in responses[0] and b"client: 10.244.2.7:51000" in responses[0]
    assert responses[1].endswith(b"\r\n\r\nok\n")
    assert b"method: POST" in responses[2] and b"host: b" in responses[2]
    assert b"Connection: close" in responses[2] and transport.closed


def test_protocol_rejects_garbage_with_400():
    proto = echo.EchoProtocol(FACTS)
    transport = FakeTransport()
    proto.connection_made(transport)
    proto.data_received(b"NOT HTTP AT ALL\r\n\r\n")
    assert transport.written.startswith(b"HTTP/1.1 400") and transport.closed


def test_protocol_answers_expect_100_continue_before_the_body():
    proto = echo.EchoProtocol(FACTS)
    transport = FakeTransport()
    proto.connection_made(transport)
    proto.data_received(b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert transport.written == b"HTTP/1.1 100 Continue\r\n\r\n"
    proto.data_received(b"abc")
    assert transport.written.count(b"HTTP/1.1 200 OK") == 1 and b"path: /big" in transport.written


def test_each_request_but_health_checks_is_logged_once_a_loop_pass():
    import io

    async def scenario():
        stream = io.StringIO()
        proto = echo.EchoProtocol(FACTS, echo.RequestLog(stream))
        proto.connection_made(FakeTransport())
        proto.data_received(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n"
                            b"GET /two?x=1 HTTP/1.1\r\n\r\n")
        before = stream.getvalue()
        await asyncio.sleep(0)
        return before, stream.getvalue()

    before, after = asyncio.run(scenario())
    assert before == ""   # written after the pass, in one write
    assert after == "10.244.2.7:51000 GET /one host=a\n10.244.2.7:51000 GET /two?x=1 host=-\n"
