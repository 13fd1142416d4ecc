"""The built-in image `netplane/echo[:tag]`: an HTTP/1.1 server that says who answered.

    netplane echo [--port P ...]

Every request on every port gets 200 and a body of `key: value` lines (valid YAML, easy to read
with curl): which pod answered (POD_NAME, POD_NAMESPACE, POD_IP, NODE_NAME, NETPLANE_IMAGE from
the environment the node agent sets), who asked (the client's ip:port as this server sees it,
which shows whether a hop masqueraded), and what was asked (Host header, method, path).
`/healthz` answers `ok`. Ports: `--port` flags, else NETPLANE_CONTAINER_PORTS, else 8080.
Each request (but /healthz) is also logged on stdout, one line, so `kubectl logs` shows who reached
the pod and from which address (a masqueraded hop shows as the node's address); `--quiet` stops it.

It starts once per pod, so it imports only asyncio, uvloop and httptools (no aiohttp).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass

DEFAULT_PORT = 8080

# ---------------------------------------------------------------- pure core: the answer text

# Values that YAML would read as something other than the same string get double quotes
# (a JSON string is a valid YAML double-quoted scalar); everything else stays plain for curl.
_PLAIN = re.compile(r"[A-Za-z0-9_./][A-Za-z0-9_./:@=,+?&%~#-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "true", "false", "on", "off", "null", "~", ".inf", ".nan"}
_YAML_NUMBER = re.compile(
    r"[-+]?(?:[0-9][0-9_]*(?::[0-5]?[0-9])*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?"
    r"|0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO]?[0-7_]+"
    r"|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}(?:[Tt ].*)?")


def yaml_scalar(value: str) -> str:
    """`value` as a YAML scalar that reads back as the same string, plain when that is safe."""
    if _PLAIN.fullmatch(value) and value.lower() not in _YAML_WORDS and not _YAML_NUMBER.fullmatch(value):
        return value
    import json
    return json.dumps(value)


@dataclass(frozen=True)
class PodFacts:
    """Who this server is, from the environment the node agent gives every container."""
    pod: str
    namespace: str
    pod_ip: str
    node: str
    image: str

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "PodFacts":
        return cls(pod=env.get("POD_NAME") or socket.gethostname(),
                   namespace=env.get("POD_NAMESPACE", ""),
                   pod_ip=env.get("POD_IP", ""),
                   node=env.get("NODE_NAME", ""),
                   image=env.get("NETPLANE_IMAGE", "netplane/echo"))


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def answer_body(facts: PodFacts, client: str, host: str, method: str, path: str) -> bytes:
    fields = [("pod", facts.pod), ("namespace", facts.namespace), ("pod_ip", facts.pod_ip),
              ("node", facts.node), ("image", facts.image), ("client", client), ("host", host),
              ("method", method), ("path", path)]
    return "".join(f"{key}: {yaml_scalar(value)}\n" for key, value in fields).encode()


def request_line(client: str, host: str, method: str, path: str) -> str:
    """One request, as the log shows it."""
    return f"{client} {method} {path} host={host or '-'}"


def response_bytes(status: str, body: bytes, keep_alive: bool, head: bool = False) -> bytes:
    headers = (f"HTTP/1.1 {status}\r\n"
               "Content-Type: text/plain; charset=utf-8\r\n"
               f"Content-Length: {len(body)}\r\n"
               "Server: netplane-echo\r\n"
               f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    return headers.encode() + (b"" if head else body)


def ports_from(args_ports: list[int] | None, env: dict[str, str]) -> list[int]:
    """--port flags win; else the agent's NETPLANE_CONTAINER_PORTS; else 8080. Duplicates dropped."""
    ports = list(args_ports or [])
    if not ports:
        ports = [int(p) for p in env.get("NETPLANE_CONTAINER_PORTS", "").split(",") if p.strip()]
    return list(dict.fromkeys(ports or [DEFAULT_PORT]))


# ---------------------------------------------------------------- shell: one protocol per connection

class RequestLog:
    """Lines to stdout, written once per event-loop pass (not one write per request under load)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        if not self.lines:
            asyncio.get_running_loop().call_soon(self.flush)
        self.lines.append(line)

    def flush(self) -> None:
        if self.lines:
            self.stream.write("\n".join(self.lines) + "\n")
            self.stream.flush()
            self.lines.clear()


class EchoProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining: httptools parses, we answer each message in order."""

    def __init__(self, facts: PodFacts, request_log: RequestLog | None = None):
        import httptools
        self.facts = facts
        self.request_log = request_log
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.url = b""
        self.host = b""
        self.expect_continue = False

    # -- asyncio callbacks
    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("", 0)
        self.client = format_address(peer[0], peer[1])

    def data_received(self, data: bytes):
        import httptools
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._send(response_bytes("400 Bad Request", b"upgrade not supported\n", False), close=True)
        except httptools.HttpParserError:
            self._send(response_bytes("400 Bad Request", b"bad request\n", False), close=True)

    # -- httptools callbacks
    def on_message_begin(self):
        self.url = b""
        self.host = b""
        self.expect_continue = False

    def on_url(self, url: bytes):
        self.url += url

    def on_header(self, name: bytes, value: bytes):
        name = name.lower()
        if name == b"host":
            self.host = value
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_continue = True

    def on_headers_complete(self):
        if self.expect_continue:  # curl waits a second for this before sending a large body
            self.expect_continue = False
            self._send(b"HTTP/1.1 100 Continue\r\n\r\n", close=False)

    def on_message_complete(self):
        method = self.parser.get_method().decode("latin-1")
        path = self.url.decode("latin-1")
        keep_alive = self.parser.should_keep_alive()
        if path == "/healthz" or path.startswith("/healthz?"):
            body = b"ok\n"
        else:
            host = self.host.decode("latin-1")
            body = answer_body(self.facts, self.client, host, method, path)
            if self.request_log is not None:
                self.request_log.add(request_line(self.client, host, method, path))
        self._send(response_bytes("200 OK", body, keep_alive, head=method == "HEAD"), close=not keep_alive)

    def _send(self, data: bytes, close: bool):
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(data)
        if close:
            self.transport.close()


async def serve(ports: list[int], facts: PodFacts, stop: asyncio.Event, log_requests: bool = True) -> None:
    """Listen on 0.0.0.0 and (when the kernel has IPv6) :: for every port, until `stop`."""
    loop = asyncio.get_running_loop()
    request_log = RequestLog() if log_requests else None
    servers = []
    for port in ports:
        servers.append(await loop.create_server(lambda: EchoProtocol(facts, request_log), "0.0.0.0", port,
                                                reuse_address=True))
        try:  # a separate v6-only socket, so IPv4 clients show as plain a.b.c.d:port
            servers.append(await loop.create_server(lambda: EchoProtocol(facts, request_log), "::", port,
                                                    reuse_address=True, family=socket.AF_INET6))
        except OSError:
            pass  # no IPv6 in this namespace
    print(f"netplane echo: pod {facts.pod} serving on ports {','.join(map(str, ports))}", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="netplane echo", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, action="append", metavar="P",
                        help=f"port to serve on, repeatable (default: NETPLANE_CONTAINER_PORTS or {DEFAULT_PORT})")
    parser.add_argument("--quiet", action="store_true", help="do not log each request on stdout")
    args = parser.parse_args(argv)
    for port in args.port or []:
        if not 0 < port < 65536:
            parser.error(f"--port {port}: must be between 1 and 65535")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    ports = ports_from(args.port, dict(os.environ))
    facts = PodFacts.from_env(dict(os.environ))
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(ports, facts, stop, log_requests=not args.quiet)

    try:
        asyncio.run(run())
    except OSError as err:
        print(f"netplane echo: cannot listen: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
