"""Test support that ships with the code: the CoreDNS handler_test fixture re-expressed, and helpers
to query a Table and read replies as zone-file text.

Zone cluster.local, namespace testns; the table tests query a Table built from these objects through
the same respond() the server calls, and compare sections as zone-file text.
"""
from __future__ import annotations

from dnslib import DNSRecord, EDNS0, QTYPE

from netplane.dns import model, wire, zone
from netplane.objects import load_documents

OBJECTS_YAML = """
apiVersion: v1
kind: Namespace
metadata: {name: emptyns}
---
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: testns}
spec:
  clusterIP: 10.0.0.1
  ports: [{name: http, protocol: TCP, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: svc1-abc, namespace: testns, labels: {kubernetes.io/service-name: svc1}}
endpoints:
- addresses: [172.0.0.1]
  hostname: ep1a
  conditions: {ready: true}
ports: [{name: http, protocol: TCP, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: svcempty, namespace: testns}
spec:
  clusterIP: 10.0.0.2
  ports: [{protocol: TCP, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: svc6, namespace: testns}
spec:
  clusterIP: 1234:abcd::1
  ports: [{name: http, protocol: TCP, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: hdls1, namespace: testns}
spec:
  clusterIP: None
  ports: [{name: http, protocol: TCP, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hdls1-v4, namespace: testns, labels: {kubernetes.io/service-name: hdls1}}
addressType: IPv4
endpoints:
- addresses: [172.0.0.2]
- addresses: [172.0.0.3]
- addresses: [172.0.0.4]
  hostname: dup-name
- addresses: [172.0.0.5]
  hostname: dup-name
- addresses: [172.0.0.9]
  conditions: {ready: false}
ports: [{name: http, protocol: TCP, port: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hdls1-v6, namespace: testns, labels: {kubernetes.io/service-name: hdls1}}
addressType: IPv6
endpoints:
- addresses: ["5678:abcd::1"]
- addresses: ["5678:abcd::2"]
ports: [{name: http, protocol: TCP, port: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: hdlsprtls, namespace: testns}
spec: {clusterIP: None}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hdlsprtls-x, namespace: testns, labels: {kubernetes.io/service-name: hdlsprtls}}
endpoints:
- addresses: [172.0.0.20]
---
apiVersion: v1
kind: Service
metadata: {name: hdlsnone, namespace: testns}
spec: {clusterIP: None, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hdlsnone-x, namespace: testns, labels: {kubernetes.io/service-name: hdlsnone}}
endpoints:
- addresses: [172.0.0.30]
  conditions: {ready: false}
---
apiVersion: v1
kind: Service
metadata: {name: external, namespace: testns}
spec: {type: ExternalName, externalName: ext.interwebs.test}
---
apiVersion: v1
kind: Service
metadata: {name: external-to-service, namespace: testns}
spec: {type: ExternalName, externalName: svc1.testns.svc.cluster.local.}
---
apiVersion: v1
kind: Service
metadata: {name: svc-dual-stack, namespace: testns}
spec:
  clusterIP: 10.0.0.3
  clusterIPs: [10.0.0.3, "10::3"]
  ports: [{name: http, protocol: TCP, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: noports, namespace: testns}
spec: {clusterIP: 10.0.0.4}
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.0.0.10
  ports: [{name: dns, protocol: UDP, port: 53}, {name: dns-tcp, protocol: TCP, port: 53}]
"""

SERIAL = 1499347823


def fixture_objects() -> list[dict]:
    return load_documents(OBJECTS_YAML, "fixture")


def fixture_table(objects: list[dict] | None = None, ttl: int = 5) -> wire.Table:
    views = model.from_objects(fixture_objects() if objects is None else objects)
    return wire.Table(zone.build_zone(views, "cluster.local", ttl, SERIAL))


def query(name: str, qtype: str = "A", edns: int | None = None, qid: int = 4321) -> bytes:
    message = DNSRecord.question(name, qtype)
    message.header.id = qid
    if edns is not None:
        message.add_ar(EDNS0(udp_len=edns))
    return bytes(message.pack())


def section_text(records) -> list[str]:
    """Records as normalised zone-file lines (OPT pseudo-records left out)."""
    lines = []
    for rr in records:
        if rr.rtype == QTYPE.OPT:
            continue
        lines.append(" ".join(f"{rr.rname} {rr.ttl} IN {QTYPE[rr.rtype]} {rr.rdata}".split()))
    return lines


def zone_lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.strip().splitlines() if line.strip()]


class ServerProcess:
    """`netplane dns serve ARGS` as a child process on a free loopback port (port 0: the server logs
    the address it bound). A context manager: the process is stopped even when the test fails."""

    def __init__(self, *args: str, listen: str = "127.0.0.1:0", health: bool = True, env=None,
                 netns: str | None = None):
        import sys
        from netplane.netns import in_netns
        argv = [sys.executable, "-m", "netplane", "dns", "serve", "--listen", listen, *args]
        if health:
            argv += ["--health-listen", "127.0.0.1:0"]
        self.argv = in_netns(netns, argv)  # `ip netns exec` execs: the child is the server itself
        self.env = env
        self.proc = None
        self.lines: list[dict] = []
        self.port = self.health_port = None

    def __enter__(self) -> "ServerProcess":
        import json
        import subprocess
        import threading
        import time

        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=self.env)
        listening = threading.Event()

        def drain() -> None:
            for line in self.proc.stderr:
                try:
                    entry = json.loads(line)
                except ValueError:
                    entry = {"msg": line.rstrip()}
                self.lines.append(entry)
                if entry.get("msg") == "listening":
                    listening.set()

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + 30
        while not listening.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"dns server did not start: {self.lines}")
        entry = next(e for e in self.lines if e.get("msg") == "listening")
        self.port = int(entry["udp_tcp"].rsplit(":", 1)[1])
        if entry.get("health"):
            self.health_port = int(entry["health"].rsplit(":", 1)[1])
        return self

    def logged(self, msg: str) -> list[dict]:
        return [e for e in self.lines if e.get("msg") == msg]

    def __exit__(self, *exc) -> None:
        import subprocess
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def dig(port: int, *args: str, server: str = "127.0.0.1") -> "DigResult":
    """Run the real dig against the server; parse status, flags and the sections."""
    from netplane import netns
    out = netns.run(["dig", f"@{server}", "-p", str(port), "+time=2", "+tries=1", *args], check=False).stdout
    return DigResult(out)


class DigResult:
    def __init__(self, text: str):
        import re
        self.text = text
        status = re.search(r"status: (\w+)", text)
        self.status = status.group(1) if status else None
        flags = re.search(r";; flags: ([\w ]*);", text)
        self.flags = set(flags.group(1).split()) if flags else set()
        self.sections: dict[str, list[str]] = {}
        section = None
        for line in text.splitlines():
            head = re.match(r";; (\w+) SECTION:", line)
            if head:
                section = head.group(1).lower()
                self.sections[section] = []
            elif not line.strip():
                section = None
            elif section and not line.startswith(";"):
                self.sections[section].append(" ".join(line.split()))
        self.udp_size = None
        edns = re.search(r"; EDNS: version: (\d+), flags:[^;]*; udp: (\d+)", text)
        if edns:
            self.udp_size = int(edns.group(2))
        self.via_tcp = "(TCP)" in text

    def records(self, section: str = "answer") -> list[str]:
        return self.sections.get(section, [])


class UpstreamStub:
    """A small upstream DNS server on 127.0.0.1 (UDP and TCP, same port), for forwarding tests.

    `answers` maps a lower-case name to its A addresses; other names are NXDOMAIN, other types of
    known names NODATA, both with an SOA whose TTL is `negative_ttl`. UDP replies over 1232 bytes
    are truncated (TC), so big answers need TCP. `queries` records what it was asked."""

    def __init__(self, answers: dict[str, list[str]], ttl: int = 300, negative_ttl: int = 60):
        self.answers = answers
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.queries: list[tuple[str, str, str]] = []  # (name, type, "udp"/"tcp")
        self.servers = []
        self.port = None

    def resolve(self, request, handler):
        from dnslib import NS, RR, SOA, A
        question = request.q
        name = str(question.qname).rstrip(".").lower()
        proto = "tcp" if handler.protocol == "tcp" else "udp"
        self.queries.append((name, QTYPE[question.qtype], proto))
        reply = request.reply()
        if name in self.answers and question.qtype == QTYPE.A:
            for ip in self.answers[name]:
                reply.add_answer(RR(question.qname, QTYPE.A, ttl=self.ttl, rdata=A(ip)))
        elif name == "" and question.qtype == QTYPE.NS:
            reply.add_answer(RR(".", QTYPE.NS, ttl=self.ttl, rdata=NS("stub.test.")))
        else:
            if name not in self.answers:
                reply.header.rcode = 3
            reply.add_auth(RR("test.", QTYPE.SOA, ttl=self.negative_ttl,
                              rdata=SOA("stub.test.", "admin.test.", (1, 60, 60, 60, self.negative_ttl))))
        return reply

    def asked(self, name: str) -> int:
        return sum(1 for q in self.queries if q[0] == name)

    def start(self) -> "UpstreamStub":
        from dnslib.server import DNSHandler, DNSLogger, DNSServer

        class Handler(DNSHandler):
            udplen = 1232

        quiet = DNSLogger(log="-recv,-send,-request,-reply,-truncated,-error,-data", prefix=False)
        for _ in range(20):  # the free UDP port may be taken for TCP: try another
            udp = DNSServer(self, "127.0.0.1", 0, logger=quiet, handler=Handler)
            self.port = udp.server.server_address[1]
            try:
                tcp = DNSServer(self, "127.0.0.1", self.port, tcp=True, logger=quiet, handler=Handler)
                break
            except OSError:
                udp.server.server_close()
        else:
            raise RuntimeError("no port free for both UDP and TCP")
        self.servers = [udp, tcp]
        for server in self.servers:
            server.start_thread()
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.server.shutdown()
            server.server.server_close()
        self.servers = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"
