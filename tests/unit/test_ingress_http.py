"""End to end with real HTTP on loopback: `netplane ingress serve --objects FILE` as a process, real
backends (`netplane echo` processes and small in-test servers), real sockets. No root needed.

Covers routing by host and path (the conformance path table over the wire, paths matched normalised),
404, 503, keep-alive, round-robin, forwarding headers, hop-by-hop removal, the Server header,
pipelining, chunked streaming both ways, smuggling inputs, 431, 413 (Content-Length and chunked), 502,
504, retry on another endpoint, Expect: 100-continue, HTTP/1.0 clients (keep-alive, no chunked coding,
no Host), absolute-form targets, junk after an upstream response (the connection is not reused), a 101
nobody asked for (502), a request sent again when its pooled upstream connection turns out closed
(only when idempotent and small enough to have been kept), upstream connect timeout, slow clients
(header, send timeouts), WebSocket upgrade, TLS by SNI, the HTTP to HTTPS redirect and --workers with
SO_REUSEPORT.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

VENV_BIN = Path(sys.executable).parent
NETPLANE = [sys.executable, "-m", "netplane"]


# ------------------------------------------------------------------------------ helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {port}")
            time.sleep(0.02)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RecordingBackend(BaseHTTPRequestHandler):
    """Answers JSON describing the request it got (which backend, the head, the body size).
    Special paths: /chunked-response, /slow, /garbage, /close-delimited, /kib/N (N KiB of "k"; then
    closing the connection with `?close`). Every request path it saw (before reading the body) goes
    into `server.seen`."""
    protocol_version = "HTTP/1.1"
    server_version = "test-backend"

    def log_message(self, *args):
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self):
        self.server.seen.append(self.path)
        body = self._body()
        path = self.path
        if path.startswith("/slow"):
            time.sleep(3)
        if path.startswith("/kib/"):
            data = b"k" * (int(path[5:].split("?")[0]) << 10)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            if "close" in path:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)
            return
        if path.startswith("/garbage"):
            self.wfile.write(b"THIS IS NOT HTTP\r\n\r\n")
            self.close_connection = True
            return
        info = {"backend": self.server.name, "method": self.command, "path": path,
                "headers": [[k, v] for k, v in self.headers.items()], "body_len": len(body),
                "request_version": self.request_version, "peer": self.client_address[1]}
        data = json.dumps(info).encode()
        if path.startswith("/chunked-response"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(data), 7):
                piece = data[i:i + 7]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        if path.startswith("/close-delimited"):
            self.wfile.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nKeep-Alive: timeout=5\r\n\r\n" + data)
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "keep-alive, X-Secret-Hop")
        self.send_header("X-Secret-Hop", "must-not-pass")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer


class ThreadedServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def start_backend(name: str, handler=RecordingBackend):
    server = ThreadedServer(("127.0.0.1", 0), handler)
    server.name = name
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class WebSocketish(socketserver.BaseRequestHandler):
    """Answers an Upgrade with 101, then echoes every byte back upper-cased."""

    def handle(self):
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.request.recv(4096)
            if not chunk:
                return
            head += chunk
        head, rest = head.split(b"\r\n\r\n", 1)
        if b"upgrade: websocket" not in head.lower():
            self.request.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return
        self.request.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\n\r\n")
        if rest:
            self.request.sendall(rest.upper())
        while True:
            data = self.request.recv(4096)
            if not data:
                self.request.shutdown(socket.SHUT_WR)
                return
            self.request.sendall(data.upper())


# ------------------------------------------------------------------------------ objects

def svc_objects(name: str, ports: list[int], ready: bool = True) -> list[dict]:
    """A Service `name` port 80 ('http') -> one EndpointSlice per backend port on 127.0.0.1."""
    objs = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
             "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}]
    for i, port in enumerate(ports):
        objs.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                     "metadata": {"name": f"{name}-{i}", "namespace": "default",
                                  "labels": {"kubernetes.io/service-name": name}},
                     "ports": [{"name": "http", "port": port}],
                     "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": ready}}]})
    return objs


def rule(host, paths):
    return {**({"host": host} if host else {}),
            "http": {"paths": [{"path": p, "pathType": t, "backend": {"service": {"name": s, "port": {"number": 80}}}}
                               for p, t, s in paths]}}


def self_signed(tmp: Path, cn: str) -> tuple[bytes, bytes]:
    cert, key = tmp / f"{cn}.crt", tmp / f"{cn}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", f"/CN={cn}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert.read_bytes(), key.read_bytes()


def tls_secret(name: str, cert: bytes, key: bytes) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": name, "namespace": "default"},
            "data": {"tls.crt": base64.b64encode(cert).decode(), "tls.key": base64.b64encode(key).decode()}}


CONFORMANCE_SERVICES = ["foo-exact", "foo-prefix", "aaa-slash-bbb-prefix", "aaa-prefix",
                        "aaa-slash-bbb-slash-prefix", "foo-slash-exact"]


# ------------------------------------------------------------------------------ the world

class World:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.servers: list = []

    def echo(self, pod: str) -> int:
        port = free_port()
        proc = subprocess.Popen([*NETPLANE, "echo", "--port", str(port)], env={**os.environ, "POD_NAME": pod},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        wait_port(port, proc)
        return port

    def backend(self, name: str, handler=RecordingBackend) -> int:
        server = start_backend(name, handler)
        self.servers.append(server)
        return server.server_address[1]

    def ingress(self, objects: list[dict], *flags: str, tls: bool = False, workers: int = 1,
                health: bool = False) -> dict:
        path = self.tmp / f"objects-{len(self.procs)}.yaml"
        path.write_text(yaml.safe_dump_all(objects))
        ports = {"http": free_port()}
        argv = [*NETPLANE, "ingress", "serve", "--objects", str(path), "--listen", f"127.0.0.1:{ports['http']}",
                "--workers", str(workers), *flags]
        if tls:
            ports["https"] = free_port()
            argv += ["--tls-listen", f"127.0.0.1:{ports['https']}"]
        if health:
            ports["health"] = free_port()
            argv += ["--health-listen", f"127.0.0.1:{ports['health']}"]
        log = open(self.tmp / f"ingress-{len(self.procs)}.log", "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=log)
        self.procs.append(proc)
        for port in ports.values():
            wait_port(port, proc)
        ports["log"] = log.name
        return ports

    def close(self):
        for proc in reversed(self.procs):
            stop_process(proc)
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("ingress"))
    try:
        w.echo_a, w.echo_b = w.echo("pod-a"), w.echo("pod-b")
        w.hdr = w.backend("hdr")
        w.hdr_seen = w.servers[-1].seen
        w.ws = w.backend("ws", WebSocketish)
        dead = free_port()   # nothing listens here: connects are refused
        conformance = {name: w.backend(name) for name in CONFORMANCE_SERVICES}
        objects = (svc_objects("a", [w.echo_a]) + svc_objects("b", [w.echo_b])
                   + svc_objects("ab", [w.echo_a, w.echo_b]) + svc_objects("hdr", [w.hdr])
                   + svc_objects("ws", [w.ws]) + svc_objects("retry", [dead, w.echo_a])
                   + svc_objects("down", [w.echo_a], ready=False))
        for name, port in conformance.items():
            objects += svc_objects(name, [port])
        a_cert, a_key = self_signed(w.tmp, "a.test")
        b_cert, b_key = self_signed(w.tmp, "b.test")
        objects += [tls_secret("a-tls", a_cert, a_key), tls_secret("b-tls", b_cert, b_key)]
        objects.append({
            "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": "main", "namespace": "default", "creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"ingressClassName": "netplane",
                     "tls": [{"hosts": ["a.test"], "secretName": "a-tls"}, {"hosts": ["b.test"], "secretName": "b-tls"}],
                     "rules": [rule("a.test", [("/", "Prefix", "a"), ("/down", "Prefix", "down"),
                                               ("/gone", "Prefix", "missing")]),
                               rule("b.test", [("/", "Prefix", "b")]),
                               rule("*.wild.test", [("/", "Prefix", "b")]),
                               rule("rr.test", [("/", "Prefix", "ab")]),
                               rule("hdr.test", [("/", "Prefix", "hdr")]),
                               rule("ws.test", [("/", "Prefix", "ws")]),
                               rule("retry.test", [("/", "Prefix", "retry")]),
                               rule("exact-path-rules", [("/foo", "Exact", "foo-exact")]),
                               rule("prefix-path-rules", [("/foo", "Prefix", "foo-prefix"),
                                                          ("/aaa/bbb", "Prefix", "aaa-slash-bbb-prefix"),
                                                          ("/aaa", "Prefix", "aaa-prefix")]),
                               rule("mixed-path-rules", [("/foo", "Prefix", "foo-prefix"), ("/foo", "Exact", "foo-exact")]),
                               rule("trailing-slash-path-rules", [("/aaa/bbb/", "Prefix", "aaa-slash-bbb-slash-prefix"),
                                                                  ("/foo/", "Exact", "foo-slash-exact")])]}})
        objects.append({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                        "metadata": {"name": "other-class", "namespace": "default"},
                        "spec": {"ingressClassName": "some-invalid-class-name",
                                 "rules": [rule("ingress-class", [("/", "Prefix", "a")])]}})
        w.objects = objects
        w.ports = w.ingress(objects, "--read-timeout", "1", "--max-body-size", "1m", "--client-timeout", "2",
                            tls=True, health=True)
        w.port = w.ports["http"]
        yield w
    finally:
        w.close()


def get(world, host, path="/", method="GET", headers=None, body=None, port=None):
    conn = http.client.HTTPConnection("127.0.0.1", port or world.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(), resp
    finally:
        conn.close()


def pod_of(body: str) -> str:
    return yaml.safe_load(body)["pod"]


def raw(world, data: bytes, port=None, read_until_close=True) -> bytes:
    with socket.create_connection(("127.0.0.1", port or world.port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
            if not read_until_close and b"\r\n\r\n" in out:
                return out


# ------------------------------------------------------------------------------ routing

@pytest.mark.parametrize("host,path,pod", [
    ("a.test", "/", "pod-a"), ("a.test", "/x/y?z=1", "pod-a"), ("A.TEST:8080", "/", "pod-a"),
    ("b.test", "/", "pod-b"), ("one.wild.test", "/p", "pod-b"),
])
def test_routes_by_host_and_path_to_the_right_backend(world, host, path, pod):
    status, body, resp = get(world, host, path)
    assert status == 200 and pod_of(body) == pod
    assert yaml.safe_load(body)["host"] == host   # Host passed through unchanged
    assert resp.getheader("Server") == "netplane-echo"


@pytest.mark.parametrize("host,path,expected", [
    ("exact-path-rules", "/foo", "foo-exact"), ("exact-path-rules", "/foo/", 404),
    ("exact-path-rules", "/FOO", 404), ("exact-path-rules", "/bar", 404),
    ("prefix-path-rules", "/foo", "foo-prefix"), ("prefix-path-rules", "/foo/", "foo-prefix"),
    ("prefix-path-rules", "/FOO", 404), ("prefix-path-rules", "/aaa/bbb", "aaa-slash-bbb-prefix"),
    ("prefix-path-rules", "/aaa/bbb/ccc", "aaa-slash-bbb-prefix"), ("prefix-path-rules", "/aaa/ccc", "aaa-prefix"),
    ("prefix-path-rules", "/aaaccc", 404), ("mixed-path-rules", "/foo", "foo-exact"),
    ("trailing-slash-path-rules", "/aaa/bbb", "aaa-slash-bbb-slash-prefix"),
    ("trailing-slash-path-rules", "/aaa/bbb/", "aaa-slash-bbb-slash-prefix"),
    ("trailing-slash-path-rules", "/foo", 404),
    ("baz.bar.wild.test", "/", 404), ("wild.test", "/", 404), ("ingress-class", "/", 404),
])
def test_conformance_path_and_host_rules_over_http(world, host, path, expected):
    status, body, resp = get(world, host, path)
    if expected == 404:
        assert status == 404, body
        assert resp.getheader("Server") == "netplane-ingress"
    else:
        assert status == 200 and json.loads(body)["backend"] == expected


@pytest.mark.parametrize("path,expected", [
    ("/aaa/bbb/../ccc", "aaa-prefix"), ("/aaa/%2e%2e/foo/x", "foo-prefix"), ("/aaa//bbb/x", "aaa-slash-bbb-prefix")])
def test_paths_are_matched_normalised_and_sent_upstream_as_they_came(world, path, expected):
    out = raw(world, b"GET %s HTTP/1.1\r\nHost: prefix-path-rules\r\nConnection: close\r\n\r\n" % path.encode())
    seen = json.loads(out.partition(b"\r\n\r\n")[2])
    assert seen["backend"] == expected and seen["path"] == path


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH"])
def test_methods_pass_unchanged(world, method):
    status, body, _ = get(world, "hdr.test", "/m?q=1", method=method, body=b"x" if method != "GET" else None)
    info = json.loads(body)
    assert status == 200 and info["method"] == method and info["path"] == "/m?q=1"
    assert info["request_version"] == "HTTP/1.1"


def test_missing_service_and_no_ready_endpoints_answer_503(world):
    for path, why in (("/down", "no ready endpoints"), ("/gone/x", "not found")):
        status, body, _ = get(world, "a.test", path)
        assert status == 503 and why in body


def test_unknown_host_is_404(world):
    assert get(world, "nope.test")[0] == 404


def test_keep_alive_on_both_sides(world):
    conn = http.client.HTTPConnection("127.0.0.1", world.port, timeout=10)
    peers, sockets = set(), set()
    for i in range(5):
        conn.request("GET", f"/k{i}", headers={"Host": "hdr.test"})
        resp = conn.getresponse()
        peers.add(json.loads(resp.read())["peer"])
        sockets.add(id(conn.sock))
        assert resp.getheader("Connection") is None   # HTTP/1.1 keep-alive is the default
    conn.close()
    assert len(sockets) == 1        # one client connection carried all five
    assert len(peers) == 1          # and one pooled upstream connection served them


def test_round_robin_across_ready_endpoints(world):
    conn = http.client.HTTPConnection("127.0.0.1", world.port, timeout=10)
    pods = []
    for _ in range(10):
        conn.request("GET", "/", headers={"Host": "rr.test"})
        pods.append(pod_of(conn.getresponse().read().decode()))
    conn.close()
    assert set(pods) == {"pod-a", "pod-b"}
    assert all(pods[i] != pods[i + 1] for i in range(9)), pods


def test_failed_connect_is_retried_on_another_endpoint(world):
    for _ in range(6):
        status, body, _ = get(world, "retry.test")
        assert status == 200 and pod_of(body) == "pod-a"


# ------------------------------------------------------------------------------ headers

def test_forwarding_headers_set_and_hop_by_hop_removed_both_ways(world):
    status, body, resp = get(world, "hdr.test:8080", "/h", headers={
        "X-Forwarded-For": "6.6.6.6", "Connection": "keep-alive, X-Drop-Me", "X-Drop-Me": "1",
        "Keep-Alive": "timeout=5", "Proxy": "http://evil", "User-Agent": "tester/1", "X-Keep": "yes"})
    headers = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert headers["host"] == "hdr.test:8080"
    assert headers["x-forwarded-for"] == "127.0.0.1" and headers["x-real-ip"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http" and headers["x-forwarded-host"] == "hdr.test:8080"
    assert headers["x-forwarded-port"] == str(world.port)
    assert headers["user-agent"] == "tester/1" and headers["x-keep"] == "yes"
    for gone in ("x-drop-me", "keep-alive", "proxy", "connection"):
        assert gone not in headers, gone
    assert resp.getheader("X-Secret-Hop") is None and resp.getheader("Server").startswith("test-backend")


def test_server_header_is_added_only_when_the_upstream_sends_none(world):
    _, _, resp = get(world, "hdr.test", "/close-delimited")   # this answer carries no Server header
    assert resp.msg.get_all("Server") == ["netplane-ingress"]
    _, _, resp = get(world, "hdr.test", "/h")                  # this one does: passed on, not doubled
    servers = resp.msg.get_all("Server")
    assert len(servers) == 1 and servers[0].startswith("test-backend")


# ------------------------------------------------------------------------------ bodies and framing

def test_chunked_request_body_and_chunked_response_are_streamed(world):
    def chunks():
        for _ in range(100):
            yield b"y" * 1000
    conn = http.client.HTTPConnection("127.0.0.1", world.port, timeout=10)
    conn.request("POST", "/chunked-response", body=chunks(), headers={"Host": "hdr.test"},
                 encode_chunked=True)
    resp = conn.getresponse()
    info = json.loads(resp.read())
    assert resp.status == 200 and info["body_len"] == 100_000
    assert resp.getheader("Transfer-Encoding") == "chunked"
    conn.close()


GIB = 1 << 30
_MIB_CHUNK = b"100000\r\n" + b"z" * (1 << 20) + b"\r\n"   # one 1 MiB chunk, framed
_STALL = 0.3   # a consumer this slow at first: a proxy without back-pressure would buffer hundreds of MiB


def send_chunked(sock: socket.socket, size: int) -> None:
    """`size` bytes (a multiple of 1 MiB) as 1 MiB chunks, then the last chunk."""
    for _ in range(size >> 20):
        sock.sendall(_MIB_CHUNK)
    sock.sendall(b"0\r\n\r\n")


def read_head(f) -> bytes:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = f.readline(65537)
        if not line:
            raise EOFError(f"connection closed in a head: {head!r}")
        head += line
    return head


def read_chunked(f) -> tuple[int, int]:
    """Read one chunked body from buffered reader `f` (any chunk sizes the proxy chose):
    (bytes of data, how many of them were not b"z")."""
    buf = memoryview(bytearray(1 << 20))
    total = odd = 0
    while True:
        size = int(f.readline(100).split(b";")[0], 16)
        if size == 0:
            assert f.readline(100) == b"\r\n"   # no trailers
            return total, odd
        while size:
            n = f.readinto(buf[:min(size, len(buf))])
            if not n:
                raise EOFError("connection closed in a chunk")
            if total < (1 << 20):   # spot-check the content of the first MiB
                odd += n - bytes(buf[:n]).count(b"z")
            size -= n
            total += n
        assert f.read(2) == b"\r\n"


class StreamingBackend(socketserver.BaseRequestHandler):
    """Raw sockets, one request per connection. `POST /upload` (chunked): reads the body slowly at
    first, answers its size. `GET /download`: answers 1 GiB chunked."""

    def handle(self):
        f = self.request.makefile("rb", buffering=1 << 16)
        head = read_head(f)
        if head.startswith(b"POST /upload"):
            time.sleep(_STALL)
            total, odd = read_chunked(f)
            body = json.dumps({"received": total, "odd": odd}).encode()
            self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                                 % (len(body), body))
        else:
            self.request.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            send_chunked(self.request, GIB)


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def test_1gib_chunked_bodies_both_ways_stream_in_bounded_memory(world):
    """A 1 GiB chunked upload and a 1 GiB chunked download through a fresh proxy (its peak RSS is
    about this test only), each with a consumer that stalls at first: the proxy must push back on the
    producer instead of buffering, so its peak RSS stays far below the body size."""
    port = world.backend("stream", StreamingBackend)
    ports = world.ingress(svc_objects("stream", [port]) + [{
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "s", "namespace": "default"},
        "spec": {"rules": [rule("stream.test", [("/", "Prefix", "stream")])]}}], "--no-access-log")
    proxy_pid = world.procs[-1].pid
    with socket.create_connection(("127.0.0.1", ports["http"]), timeout=30) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: stream.test\r\nTransfer-Encoding: chunked\r\n\r\n")
        send_chunked(s, GIB)
        f = s.makefile("rb")
        head = read_head(f)
        assert head.startswith(b"HTTP/1.1 200"), head
        body = f.read(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
        assert json.loads(body) == {"received": GIB, "odd": 0}
    with socket.create_connection(("127.0.0.1", ports["http"]), timeout=30) as s:
        s.sendall(b"GET /download HTTP/1.1\r\nHost: stream.test\r\n\r\n")
        f = s.makefile("rb", buffering=1 << 16)
        head = read_head(f)
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower(), head
        time.sleep(_STALL)
        assert read_chunked(f) == (GIB, 0)
    peak = peak_rss_mib(proxy_pid)
    assert peak < 100, f"proxy peak RSS {peak:.1f} MiB"


def test_close_delimited_upstream_body_is_rechunked_for_the_client(world):
    status, body, resp = get(world, "hdr.test", "/close-delimited")
    assert status == 200 and json.loads(body)["backend"] == "hdr"
    assert resp.getheader("Transfer-Encoding") == "chunked" and resp.getheader("Keep-Alive") is None


def test_pipelined_requests_are_answered_in_order(world):
    reqs = b"".join(b"GET /p%d HTTP/1.1\r\nHost: hdr.test\r\n\r\n" % i for i in range(3))
    reqs += b"GET /last HTTP/1.1\r\nHost: hdr.test\r\nConnection: close\r\n\r\n"
    out = raw(world, reqs)
    bodies = [seg for seg in out.split(b"HTTP/1.1 200 OK") if seg]
    found = [json.loads(seg[seg.index(b"{"):seg.rindex(b"}") + 1])["path"] for seg in bodies]
    assert found == ["/p0", "/p1", "/p2", "/last"]


def test_head_response_has_no_body(world):
    out = raw(world, b"HEAD /h HTTP/1.1\r\nHost: hdr.test\r\n\r\nGET /after HTTP/1.1\r\nHost: hdr.test\r\n"
                     b"Connection: close\r\n\r\n")
    first, _, rest = out.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200") and b"Content-Length:" in first
    assert rest.startswith(b"HTTP/1.1 200") and b'"/after"' in rest


def test_expect_100_continue_passes_the_interim_response_before_the_body(world):
    with socket.create_connection(("127.0.0.1", world.port), timeout=10) as s:
        s.sendall(b"POST /expect HTTP/1.1\r\nHost: hdr.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        f = s.makefile("rb")
        interim = read_head(f)   # the backend's 100, passed on before the client has sent its body
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        s.sendall(b"hello")
        head = read_head(f)
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
        assert head.startswith(b"HTTP/1.1 200 ") and json.loads(f.read(length))["body_len"] == 5


def _response_parts(out: bytes) -> tuple[bytes, bytes]:
    head, _, body = out.partition(b"\r\n\r\n")
    return head, body


def test_http_1_0_client_gets_an_answer_and_the_connection_closed(world):
    out = raw(world, b"GET /ten HTTP/1.0\r\nHost: hdr.test\r\n\r\n")   # read until the proxy closes
    head, body = _response_parts(out)
    assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close" in head
    assert json.loads(body)["path"] == "/ten"


def test_http_1_0_keep_alive_is_honoured(world):
    with socket.create_connection(("127.0.0.1", world.port), timeout=10) as s:
        for path in (b"/ka1", b"/ka2"):
            s.sendall(b"GET %s HTTP/1.0\r\nHost: hdr.test\r\nConnection: keep-alive\r\n\r\n" % path)
            head, body, _ = get_response(s)
            assert b"\r\nConnection: keep-alive" in head and json.loads(body)["path"] == path.decode()


def test_chunked_upstream_answer_to_an_http_1_0_client_ends_with_the_connection(world):
    """HTTP/1.0 has no chunked coding: the body is sent as is and its end is the connection's end."""
    out = raw(world, b"GET /chunked-response HTTP/1.0\r\nHost: hdr.test\r\n\r\n")
    head, body = _response_parts(out)
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding" not in head.lower()
    assert b"\r\nConnection: close" in head and json.loads(body)["path"] == "/chunked-response"


def test_http_1_0_request_without_host_is_routed_as_no_host(world):
    out = raw(world, b"GET / HTTP/1.0\r\n\r\n")   # allowed in 1.0; no rule matches an empty host here
    assert out.startswith(b"HTTP/1.1 404 "), out[:100]


def test_absolute_form_target_is_routed_by_its_authority(world):
    out = raw(world, b"GET http://hdr.test:8080/abs?q=1 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    head, body = _response_parts(out)
    assert head.startswith(b"HTTP/1.1 200 "), head
    seen = json.loads(body)
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert seen["path"] == "/abs?q=1" and headers["host"] == "hdr.test:8080"   # origin form upstream


# ------------------------------------------------------------------------------ safety

@pytest.mark.parametrize("name,request_bytes", [
    ("CL and TE", b"POST / HTTP/1.1\r\nHost: hdr.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("duplicate CL", b"POST / HTTP/1.1\r\nHost: hdr.test\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"),
    ("same duplicate CL", b"POST / HTTP/1.1\r\nHost: hdr.test\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd"),
    ("missing Host", b"GET / HTTP/1.1\r\nUser-Agent: x\r\n\r\n"),
    ("two Hosts", b"GET / HTTP/1.1\r\nHost: hdr.test\r\nHost: a.test\r\n\r\n"),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: hdr.test\r\nX-A: 1\r\n  folded\r\n\r\n"),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : hdr.test\r\n\r\n"),
    ("bad chunk size", b"POST / HTTP/1.1\r\nHost: hdr.test\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nabcde\r\n0\r\n\r\n"),
    ("TE not final chunked", b"POST / HTTP/1.1\r\nHost: hdr.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n"),
    ("bare LF", b"GET / HTTP/1.1\nHost: hdr.test\n\n"),
    ("TE xchunked", b"POST / HTTP/1.1\r\nHost: hdr.test\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nabcde\r\n0\r\n\r\n"),
    ("TE gzip only", b"POST / HTTP/1.1\r\nHost: hdr.test\r\nTransfer-Encoding: gzip\r\n\r\nabcde"),
    ("TE chunked then gzip", b"POST / HTTP/1.1\r\nHost: hdr.test\r\nTransfer-Encoding: chunked\r\n"
                             b"Transfer-Encoding: gzip\r\n\r\n0\r\n\r\n"),
    ("CL with a sign", b"POST / HTTP/1.1\r\nHost: hdr.test\r\nContent-Length: +5\r\n\r\nabcde"),
    ("NUL in a header value", b"GET / HTTP/1.1\r\nHost: hdr.test\r\nX-A: a\x00b\r\n\r\n"),
    ("NUL in Host", b"GET / HTTP/1.1\r\nHost: hdr.test\x00.evil\r\n\r\n"),
])
def test_smuggling_inputs_are_refused_with_400_and_close(world, name, request_bytes):
    get(world, "hdr.test", "/warm-the-pool")   # an idle pooled upstream connection: a head would go at once
    seen = len(world.hdr_seen)
    out = raw(world, request_bytes)
    assert out.startswith(b"HTTP/1.1 400 "), (name, out[:200])
    assert b"Connection: close" in out
    assert b'"backend"' not in out   # nothing answered from the backend
    if name != "bad chunk size":     # (a body error: its valid head had gone upstream, as it streams)
        time.sleep(0.2)
        assert world.hdr_seen[seen:] == [], "the request head reached the backend"


def test_header_section_over_the_limit_is_431(world):
    out = raw(world, b"GET / HTTP/1.1\r\nHost: hdr.test\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 ")
    out = raw(world, b"GET / HTTP/1.1\r\nHost: hdr.test\r\n" + b"X-N: 1\r\n" * 150 + b"\r\n")
    assert out.startswith(b"HTTP/1.1 431 ")


def test_body_over_the_limit_is_413(world):
    out = raw(world, b"POST / HTTP/1.1\r\nHost: hdr.test\r\nContent-Length: 2000000\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413 ")
    status, _, _ = get(world, "hdr.test", "/", method="POST", body=b"z" * 2_000_000)
    assert status == 413


def test_chunked_body_over_the_limit_is_413(world):
    """No Content-Length to check up front: the limit (1m here) is counted as the chunks stream."""
    with socket.create_connection(("127.0.0.1", world.port), timeout=10) as s:
        s.sendall(b"POST /chunked-over HTTP/1.1\r\nHost: hdr.test\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):
            s.sendall(_MIB_CHUNK)
        s.sendall(b"0\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 413 "), out[:200]
    assert b"Connection: close" in out and b'"backend"' not in out
    # right at the limit passes
    conn = http.client.HTTPConnection("127.0.0.1", world.port, timeout=10)
    conn.request("POST", "/chunked-at-limit", body=iter([b"u" * (1 << 19)] * 2), headers={"Host": "hdr.test"},
                 encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["body_len"] == 1 << 20
    conn.close()


def test_bad_upstream_response_is_502(world):
    status, body, _ = get(world, "hdr.test", "/garbage")
    assert status == 502 and "bad response" in body


def test_silent_upstream_is_504(world):
    started = time.monotonic()
    status, _, _ = get(world, "hdr.test", "/slow")
    assert status == 504 and time.monotonic() - started < 2.9


def test_slow_client_gets_408(world):
    with socket.create_connection(("127.0.0.1", world.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: hdr")
        out = s.recv(4096)
    assert out.startswith(b"HTTP/1.1 408 ")


# ------------------------------------------------------------------------------ upgrade

def test_websocket_upgrade_becomes_a_two_way_pipe(world):
    with socket.create_connection(("127.0.0.1", world.port), timeout=10) as s:
        s.sendall(b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                  b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 101 ") and b"Upgrade: websocket" in head
        for word in (b"hello", b"again"):
            s.sendall(word)
            assert s.recv(100) == word.upper()
        s.shutdown(socket.SHUT_WR)   # half-close passes through; the backend then closes
        assert s.recv(100) == b""


# ------------------------------------------------------------------------------ TLS

def tls_get(world, server_name: str, host: str) -> tuple[dict, bytes]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", world.ports["https"]), timeout=10) as raw_sock:
        with ctx.wrap_socket(raw_sock, server_hostname=server_name) as s:
            der = s.getpeercert(binary_form=True)
            s.sendall(b"GET /tls HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode())
            out = b""
            while chunk := s.recv(65536):
                out += chunk
    pem = ssl.DER_cert_to_PEM_cert(der)
    text = subprocess.run(["openssl", "x509", "-noout", "-subject"], input=pem, capture_output=True,
                          text=True, check=True).stdout
    return text, out


def test_tls_certificate_chosen_by_sni_and_default_for_unknown_names(world):
    subject_a, out_a = tls_get(world, "a.test", "a.test")
    subject_b, out_b = tls_get(world, "b.test", "b.test")
    subject_x, _ = tls_get(world, "unknown.test", "a.test")
    assert "CN = a.test" in subject_a and "CN = b.test" in subject_b
    assert "netplane-ingress-default" in subject_x
    assert out_a.startswith(b"HTTP/1.1 200") and b"pod: pod-a" in out_a
    assert out_b.startswith(b"HTTP/1.1 200") and b"pod: pod-b" in out_b


def test_tls_requests_are_forwarded_with_proto_https(world):
    _, out = tls_get(world, "hdr.test", "hdr.test")
    headers = {k.lower(): v for k, v in json.loads(out[out.index(b"{"):])["headers"]}
    assert headers["x-forwarded-proto"] == "https" and headers["x-forwarded-port"] == str(world.ports["https"])


# ------------------------------------------------------------------------------ health, workers

def test_health_and_metrics(world):
    status, body, _ = get(world, "x", "/healthz", port=world.ports["health"])
    assert status == 200 and "synced" in body
    get(world, "nope.test")
    status, body, _ = get(world, "x", "/metrics", port=world.ports["health"])
    assert status == 200 and 'netplane_ingress_responses_total{code="404"}' in body


def test_access_log_has_one_line_per_request(world):
    get(world, "a.test", "/access-log-probe")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in Path(world.ports["log"]).read_text().splitlines()
                 if "access-log-probe" in line]
        if lines:
            break
        time.sleep(0.05)
    assert lines and lines[0]["status"] == 200 and lines[0]["host"] == "a.test"
    assert lines[0]["upstream"] == f"127.0.0.1:{world.echo_a}" and lines[0]["ingress"] == "default/main"


def test_workers_share_the_port_with_so_reuseport(world):
    ports = world.ingress(world.objects, "--no-access-log", workers=2, health=True)
    deadline = time.monotonic() + 10
    while True:
        status, body, _ = get(world, "x", "/healthz", port=ports["health"])
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 200 and "2/2 workers ready" in body
    for _ in range(20):   # new connections each time: the kernel spreads them over both workers
        status, body, _ = get(world, "hdr.test", "/w", port=ports["http"])
        assert status == 200
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{ports['http']}"], capture_output=True, text=True).stdout
    assert len(out.strip().splitlines()) == 2, out   # two listening sockets on one port
    # /metrics on the supervisor sums what the workers report (every second)
    deadline = time.monotonic() + 5
    while True:
        _, metrics, _ = get(world, "x", "/metrics", port=ports["health"])
        served = re.search(r'^netplane_ingress_responses_total\{code="200"\} (\S+)$', metrics, re.M)
        if (served and float(served.group(1)) >= 20) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert served and float(served.group(1)) == 20, metrics


# ------------------------------------------------------------------------------ strict timeouts

STRICT_SEND_TIMEOUT = 1.0
STRICT_CLIENT_TIMEOUT = 1.0
STRICT_CONNECT_TIMEOUT = 0.5
_MIB = b"z" * (1 << 20)


class BigResponseBackend(socketserver.BaseRequestHandler):
    """Answers one request with a 1 GiB body (Content-Length); an answer cut short because the
    other side went away is counted in `server.cut_short`."""

    def handle(self):
        read_head(self.request.makefile("rb"))
        try:
            self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % GIB)
            for _ in range(GIB >> 20):
                self.request.sendall(_MIB)
        except OSError:
            self.server.cut_short.append(time.monotonic())


def full_backlog_listener() -> tuple[socket.socket, list[socket.socket], bool]:
    """A listener that never accepts, its accept queue filled: the kernel drops further SYNs, so a
    connect to it neither succeeds nor fails (until the connector gives up). Returns the listener,
    the connections holding its queue, and whether a probe connect really hung."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    held: list[socket.socket] = []
    for _ in range(16):
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(listener.getsockname())
        except (TimeoutError, socket.timeout):
            probe.close()
            return listener, held, True
        except OSError:
            probe.close()
            break
        held.append(probe)
    return listener, held, False


def get_response(sock: socket.socket) -> tuple[bytes, bytes, object]:
    """One Content-Length response from `sock`: (head, body, the buffered reader for what follows)."""
    f = sock.makefile("rb")
    head = read_head(f)
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
    return head, f.read(length), f


@pytest.fixture(scope="module")
def strict(world):
    """A second proxy with small client and connect timeouts, --ssl-redirect, a 1 GiB backend and a
    backend whose connects hang."""
    big = start_backend("big", BigResponseBackend)
    big.cut_short = []
    world.servers.append(big)
    hole, held, hangs = full_backlog_listener()
    try:
        secrets = [o for o in world.objects if o["kind"] == "Secret"]
        objects = (svc_objects("big", [big.server_address[1]]) + svc_objects("hdr", [world.hdr])
                   + svc_objects("hole", [hole.getsockname()[1]])
                   + svc_objects("hole-retry", [hole.getsockname()[1], world.echo_a]) + secrets)
        objects.append({
            "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": "strict", "namespace": "default"},
            "spec": {"tls": [{"hosts": ["a.test"], "secretName": "a-tls"}],
                     "rules": [rule("a.test", [("/", "Prefix", "hdr")]), rule("hdr.test", [("/", "Prefix", "hdr")]),
                               rule("big.test", [("/", "Prefix", "big")]), rule("hole.test", [("/", "Prefix", "hole")]),
                               rule("hole-retry.test", [("/", "Prefix", "hole-retry")])]}})
        ports = world.ingress(objects, "--send-timeout", str(STRICT_SEND_TIMEOUT),
                              "--client-timeout", str(STRICT_CLIENT_TIMEOUT),
                              "--connect-timeout", str(STRICT_CONNECT_TIMEOUT), "--ssl-redirect",
                              "--no-access-log", tls=True)
        yield SimpleNamespace(port=ports["http"], ports=ports, big=big, hole_hangs=hangs)
    finally:
        for sock in held:
            sock.close()
        hole.close()


def test_client_that_stops_reading_is_dropped_after_the_send_timeout(strict):
    """A client that takes none of a big response is cut off (and the upstream connection with it),
    instead of being held with the backend paused behind it forever."""
    cut = len(strict.big.cut_short)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        s.settimeout(10)
        s.connect(("127.0.0.1", strict.port))
        s.sendall(b"GET /big HTTP/1.1\r\nHost: big.test\r\n\r\n")
        time.sleep(STRICT_SEND_TIMEOUT + 1)   # reading nothing
        deadline = time.monotonic() + 3
        while len(strict.big.cut_short) == cut and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(strict.big.cut_short) > cut, "the proxy still holds the stalled client and its upstream"
        received = 0
        try:
            while chunk := s.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
    assert received < 64 << 20   # what sat in buffers, then the end: not the rest of the 1 GiB


@pytest.mark.parametrize("close", [False, True], ids=["pooled upstream", "new upstream each"])
def test_pipelined_responses_to_a_client_that_does_not_read_are_not_buffered(strict, world, close):
    """Back-pressure holds across pipelined requests: while the client is not reading, the next
    request's upstream is not read either, so the proxy does not pile responses up in memory. With
    `close` every response comes on a new upstream connection (connected while writing is paused)."""
    tag = f"bp{time.monotonic_ns()}"
    seen = lambda: sum(1 for p in world.hdr_seen if p.endswith(tag))
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        s.connect(("127.0.0.1", strict.port))
        s.sendall(b"".join(b"GET /kib/32?%s%d-%s HTTP/1.1\r\nHost: hdr.test\r\n\r\n"
                           % (b"close-" if close else b"", i, tag.encode())
                           for i in range(2000)))   # 62 MiB of responses; we read none of them
        time.sleep(STRICT_SEND_TIMEOUT * 0.8)        # (before the send timeout ends it all)
        served = seen()
    # what fits in the buffers was answered (the proxy's socket send buffer at its largest, our small
    # receive buffer, the transport's own), not everything asked for
    send_buffer = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    bound = (send_buffer + (2 << 20)) // (32 << 10)
    assert served < bound, f"{served} of 2000 responses fetched for a client reading nothing (bound {bound})"


def test_client_reading_slowly_but_steadily_is_not_dropped(strict):
    """The send timeout counts from the last progress, not from the start of the response."""
    with socket.create_connection(("127.0.0.1", strict.port), timeout=10) as s:
        s.sendall(b"GET /big HTTP/1.1\r\nHost: big.test\r\n\r\n")
        f = s.makefile("rb")
        assert read_head(f).startswith(b"HTTP/1.1 200 ")
        got = 0
        until = time.monotonic() + STRICT_SEND_TIMEOUT * 3
        while time.monotonic() < until:   # about 5 MiB/s, far slower than the backend sends
            data = f.read(256 << 10)
            assert len(data) == 256 << 10 and data.count(b"z") == len(data), "the response was cut short"
            got += len(data)
            time.sleep(0.05)
    assert got >= 4 << 20


def test_request_head_trickled_a_byte_at_a_time_times_out_from_its_first_byte(strict):
    started = time.monotonic()
    out = b""
    with socket.create_connection(("127.0.0.1", strict.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: hdr.test\r\nX-Trickle: ")
        s.settimeout(0.2)
        while not out and time.monotonic() - started < STRICT_CLIENT_TIMEOUT + 4:
            try:
                s.sendall(b"a")     # a byte well within the timeout of the one before
                out = s.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                break
        elapsed = time.monotonic() - started
    assert out.startswith(b"HTTP/1.1 408 "), out[:200]
    assert elapsed < STRICT_CLIENT_TIMEOUT + 1.5


@pytest.mark.parametrize("held,rest", [
    (b"GET /second HTTP/1.1\r\nHo", b"st: hdr.test\r\nConnection: close\r\n\r\n"),
    (b"POST /second HTTP/1.1\r\nHost: hdr.test\r\nContent-Length: 4\r\nConnection: close\r\n\r\n", b"body"),
], ids=["head", "body"])
def test_pipelined_request_waiting_behind_a_slow_one_is_not_timed_out(strict, held, rest):
    """The client timeouts run only while the proxy is reading that request: one pipelined behind a
    slow request (3 s here, over the 1 s timeout) is not charged for the wait, with its head still
    incomplete or its body not sent yet."""
    with socket.create_connection(("127.0.0.1", strict.port), timeout=10) as s:
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: hdr.test\r\n\r\n" + held)
        head, body, f = get_response(s)
        assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body)["path"] == "/slow"
        assert b"connection: close" not in head.lower()
        time.sleep(STRICT_CLIENT_TIMEOUT * 0.3)
        s.sendall(rest)
        out = f.read()
    assert out.startswith(b"HTTP/1.1 200 ") and b'"/second"' in out, out[:200]


def test_plain_http_to_a_tls_host_is_redirected_to_https_with_308(strict):
    https = strict.ports["https"]
    status, _, resp = get(strict, "a.test", "/x/y?q=1")
    assert status == 308 and resp.getheader("Location") == f"https://a.test:{https}/x/y?q=1"
    status, _, resp = get(strict, "A.Test:8080", "/p", method="POST", body=b"data")   # the name only, our port
    assert status == 308 and resp.getheader("Location") == f"https://a.test:{https}/p"
    # a host with no certificate is proxied as usual
    status, body, resp = get(strict, "hdr.test", "/plain")
    assert status == 200 and json.loads(body)["path"] == "/plain" and resp.getheader("Location") is None
    # and over TLS the TLS host is served, not redirected again
    _, out = tls_get(strict, "a.test", "a.test")
    assert out.startswith(b"HTTP/1.1 200 ") and b'"/tls"' in out


def test_plain_http_is_not_redirected_without_the_flag(world):
    status, body, _ = get(world, "a.test", "/no-redirect")
    assert status == 200 and pod_of(body) == "pod-a"


def test_upstream_connect_timeout_is_honoured(strict):
    if not strict.hole_hangs:
        pytest.skip("could not make a listener whose connects hang (the kernel did not drop SYNs)")
    started = time.monotonic()
    status, body, _ = get(strict, "hole.test", "/")
    elapsed = time.monotonic() - started
    assert status == 504 and f"in {STRICT_CONNECT_TIMEOUT:g}s" in body, body
    assert STRICT_CONNECT_TIMEOUT - 0.1 < elapsed < STRICT_CONNECT_TIMEOUT + 1.5   # not the 5 s default


def test_connect_timeout_moves_on_to_another_endpoint(strict):
    if not strict.hole_hangs:
        pytest.skip("could not make a listener whose connects hang (the kernel did not drop SYNs)")
    took = []
    for _ in range(4):   # round-robin: some of these try the hanging endpoint first
        started = time.monotonic()
        status, body, _ = get(strict, "hole-retry.test", "/")
        took.append(time.monotonic() - started)
        assert status == 200 and pod_of(body) == "pod-a"
    assert STRICT_CONNECT_TIMEOUT - 0.1 < max(took) < STRICT_CONNECT_TIMEOUT + 1.5, took


# ------------------------------------------------------------------------------ stale pooled connections

class ClosesWhenReused(socketserver.BaseRequestHandler):
    """Answers the first request of each connection (keep-alive, the body length in the answer); reads
    the second one whole and closes without a word, as a server whose keep-alive timeout fired just as
    the request came. Every request it read goes into `server.seen` as (path, body length)."""

    def handle(self):
        f = self.request.makefile("rb")
        for answered in (True, False):
            try:
                head = read_head(f)
            except EOFError:
                return
            path = head.split(b" ", 2)[1].decode()
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            body = f.read(int(length.group(1))) if length else b""
            self.server.seen.append((path, len(body)))
            if answered:
                data = b"%s %d" % (path.encode(), len(body))
                self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))


def behind_own_ingress(world, name: str, handler, host: str):
    """A backend `name` (handler) as Service `name`, routed from `host` by an ingress of its own:
    (the backend server, that ingress's HTTP port)."""
    server = start_backend(name, handler)
    world.servers.append(server)
    objects = svc_objects(name, [server.server_address[1]]) + [{
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": name, "namespace": "default"},
        "spec": {"rules": [rule(host, [("/", "Prefix", name)])]}}]
    return server, world.ingress(objects, "--no-access-log")["http"]


@pytest.fixture(scope="module")
def stale(world):
    server, port = behind_own_ingress(world, "stale", ClosesWhenReused, "stale.test")
    return SimpleNamespace(port=port, seen=server.seen)


def _on_a_pooled_connection(stale, method: str, path: str, body: bytes | None = None):
    """A first request leaves an idle upstream connection in the pool; the second (method, path,
    body) is sent on it, where the backend closes without answering."""
    status, _, _ = get(stale, "stale.test", f"/warm{path}")
    assert status == 200
    del stale.seen[:]
    return get(stale, "stale.test", path, method=method, body=body)


@pytest.mark.parametrize("method,size", [("GET", 0), ("PUT", 1000)])
def test_idempotent_request_on_a_stale_pooled_connection_is_sent_again_on_a_new_one(stale, method, size):
    body = b"p" * size if size else None
    status, text, _ = _on_a_pooled_connection(stale, method, f"/again-{method}", body)
    assert status == 200 and text == f"/again-{method} {size}"   # the retry carried the whole body
    assert stale.seen == [(f"/again-{method}", size)] * 2


@pytest.mark.parametrize("method,size,why", [("POST", 10, "not idempotent"),
                                              ("PUT", 100 << 10, "too big to keep a copy of")])
def test_request_that_cannot_be_sent_again_gets_502(stale, method, size, why):
    status, text, _ = _on_a_pooled_connection(stale, method, f"/once-{size}", b"q" * size)
    assert status == 502 and "closed the connection" in text, (why, text)
    assert stale.seen == [(f"/once-{size}", size)], why   # sent once, never again


_TRICKLED = (b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\nHTTP/1.1 200 OK\r\nX-A:tight\r\nConnection: keep-alive,"
             b" X-Hop\r\nX-Hop: no\r\nX-B: spaced  \r\nContent-Length: 2\r\n\r\nok")


class CannedBackend(socketserver.BaseRequestHandler):
    """Answers the paths of ANSWERS with canned bytes (what a confused server might send, or heads cut
    up oddly); /trickled/... with _TRICKLED a byte at a time; anything else with a 200 naming the path."""
    ANSWERS = {
        b"/204-with-body": b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",   # a 204 has no body
        b"/101-unasked": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\nRAW",
        b"/one-read": _TRICKLED,   # the interim answer and the final one in one send
    }

    def handle(self):
        f = self.request.makefile("rb")
        while True:
            try:
                head = read_head(f)
            except (EOFError, OSError):
                return
            path = head.split(b" ", 2)[1]
            if path.startswith(b"/trickled"):
                for i in range(len(_TRICKLED)):
                    self.request.sendall(_TRICKLED[i:i + 1])
                    time.sleep(0.002)
                continue
            self.request.sendall(self.ANSWERS.get(path) or b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(path), path))


@pytest.fixture(scope="module")
def misbehaving(world):
    return behind_own_ingress(world, "bad", CannedBackend, "bad.test")[1]


def test_junk_after_a_response_does_not_fail_the_next_request(world, misbehaving):
    """A server that sends bytes after a complete response (here a body after a 204) has left its
    connection unusable: the next request, even one pipelined behind and started at once, goes on
    another connection instead of getting a 502 for the junk."""
    out = raw(world, b"GET /204-with-body HTTP/1.1\r\nHost: bad.test\r\n\r\n"
                     b"GET /after HTTP/1.1\r\nHost: bad.test\r\nConnection: close\r\n\r\n", port=misbehaving)
    first, _, rest = out.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 204 "), out
    assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b"\r\n\r\n/after"), out


def test_switching_protocols_nobody_asked_for_is_502(world, misbehaving):
    out = raw(world, b"GET /101-unasked HTTP/1.1\r\nHost: bad.test\r\n\r\n"
                     b"GET /after HTTP/1.1\r\nHost: bad.test\r\nConnection: close\r\n\r\n", port=misbehaving)
    first, _, rest = out.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 502 ") and b"RAW" not in out, out   # never a tunnel
    assert rest.startswith(b"502 Bad Gateway: ") and b"\r\nHTTP/1.1 200 " not in first, out
    assert rest.endswith(b"\r\n\r\n/after"), out   # and the connection goes on to the next request


# ------------------------------------------------------------------------------ stopping

def test_sigterm_lets_a_request_under_way_finish_and_closes_its_connection(world):
    ports = world.ingress(svc_objects("hdr", [world.hdr]) + [{
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "stop", "namespace": "default"},
        "spec": {"rules": [rule("hdr.test", [("/", "Prefix", "hdr")])]}}], "--no-access-log")
    proc = world.procs[-1]
    with socket.create_connection(("127.0.0.1", ports["http"]), timeout=10) as s:
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: hdr.test\r\n\r\n")   # the backend takes 3 s
        time.sleep(0.5)
        proc.terminate()
        head, body, f = get_response(s)
        assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body)["path"] == "/slow"
        assert b"\r\nConnection: close" in head   # a stopping proxy takes no next request here
        assert f.read() == b""                    # and closes the connection after the answer
    assert proc.wait(10) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ports["http"]), timeout=1).close()


@pytest.mark.parametrize("path", ["/one-read", "/trickled"])
def test_response_heads_are_passed_on_however_they_arrive(world, misbehaving, path):
    """The interim 100 and the final head, in one read or a byte a time: each passed on with its own
    headers, less the hop-by-hop ones (Connection, and X-Hop which it names)."""
    out = raw(world, b"GET %s HTTP/1.1\r\nHost: bad.test\r\nConnection: close\r\n\r\n" % path.encode(),
              port=misbehaving)
    interim, final = out.split(b"\r\n\r\n", 1)
    assert interim == b"HTTP/1.1 100 Continue\r\nX-Interim: 1", out
    head, body = final.split(b"\r\n\r\n", 1)
    status, *lines = head.split(b"\r\n")
    headers = [tuple(part.strip() for part in line.split(b":", 1)) for line in lines]
    assert status == b"HTTP/1.1 200 OK" and body == b"ok", out
    assert headers == [(b"X-A", b"tight"), (b"X-B", b"spaced"), (b"Server", b"netplane-ingress"),
                       (b"Content-Length", b"2"), (b"Connection", b"close")], out
