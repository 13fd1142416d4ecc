"""The LoadBalancer speaker: answers ARP for each LoadBalancer address from one healthy node.

    netplane lb speaker --server URL --node-name NAME --node-ip IP [--interface IF]
                        [--agent-health-url http://IP:10248/healthz] [--member-port 7946]

Like MetalLB's layer-2 mode. Every node runs a speaker. For each address, the nodes that may
announce it are those that are Ready (Node condition), whose speaker is alive and whose agent is
healthy (heard over UDP heartbeats within MEMBER_TIMEOUT, the role memberlist plays in MetalLB:
far faster than the Node's Ready condition), and, for externalTrafficPolicy Local, that have a
ready endpoint. Among them every speaker computes the same leader: the lowest
sha256("node#ip"). The leader answers ARP requests for the address (a raw AF_PACKET socket, no
kernel address is added: the proxy's rules take the packets from there) and sends gratuitous ARP
when it takes an address over, so clients' neighbour caches move at once.

Pure core: ARP frames, the membership table, leader choice. Shell: the Speaker.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import logging
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

from netplane.loadbalancer import ingress_ips

log = logging.getLogger("lb-speaker")

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARP_REQUEST, ARP_REPLY = 1, 2
PACKET_OUTGOING = 4
BROADCAST = b"\xff" * 6
MEMBER_PORT = 7946
HEARTBEAT_INTERVAL = 0.4   # seconds between heartbeats to every peer
MEMBER_TIMEOUT = 1.6       # a peer not heard from (healthy) for this long is gone
RECOMPUTE_INTERVAL = 0.2   # how often leadership is recomputed (membership changes without events)
GARP_REPEATS = (0.0, 0.5, 1.5)  # seconds after a takeover: repeats, in case one is lost or ignored
                                # (Linux ignores an update within locktime, 1 s, of the previous one)
EXCLUDE_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"


# ================================================================ pure core: ARP frames

@dataclass(frozen=True)
class Arp:
    op: int
    sender_mac: bytes
    sender_ip: str
    target_mac: bytes
    target_ip: str


def mac_bytes(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def parse_arp(frame: bytes) -> Arp | None:
    """An Ethernet frame -> the IPv4-over-Ethernet ARP packet in it, or None."""
    if len(frame) < 42 or struct.unpack("!H", frame[12:14])[0] != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    if (htype, ptype, hlen, plen) != (1, ETH_P_IP, 6, 4):
        return None
    return Arp(op, frame[22:28], socket.inet_ntoa(frame[28:32]), frame[32:38], socket.inet_ntoa(frame[38:42]))


def arp_frame(eth_dst: bytes, eth_src: bytes, arp: Arp) -> bytes:
    return (eth_dst + eth_src + struct.pack("!H", ETH_P_ARP)
            + struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, arp.op)
            + arp.sender_mac + socket.inet_aton(arp.sender_ip) + arp.target_mac + socket.inet_aton(arp.target_ip))


def answer(request: Arp, our_mac: bytes, announced: set[str]) -> bytes | None:
    """The ARP reply to a request for an address we announce, or None."""
    if request.op != ARP_REQUEST or request.target_ip not in announced:
        return None
    if request.sender_ip == request.target_ip:
        return None  # someone's gratuitous ARP (or a duplicate-address probe from a peer): not a question
    reply = Arp(ARP_REPLY, our_mac, request.target_ip, request.sender_mac, request.sender_ip)
    return arp_frame(request.sender_mac, our_mac, reply)


def gratuitous(our_mac: bytes, ip: str) -> list[bytes]:
    """A gratuitous request and reply (hosts differ in which one they honour), both broadcast."""
    return [arp_frame(BROADCAST, our_mac, Arp(ARP_REQUEST, our_mac, ip, b"\0" * 6, ip)),
            arp_frame(BROADCAST, our_mac, Arp(ARP_REPLY, our_mac, ip, BROADCAST, ip))]


# ================================================================ pure core: membership and leaders

def encode_heartbeat(node: str, healthy: bool) -> bytes:
    return json.dumps({"node": node, "healthy": healthy}).encode()


def decode_heartbeat(data: bytes) -> tuple[str, bool] | None:
    try:
        message = json.loads(data)
        node, healthy = message["node"], message["healthy"]
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(node, str) or not node or not isinstance(healthy, bool):
        return None
    return node, healthy


@dataclass
class Membership:
    """Who was heard healthy recently (time injected: tests drive it)."""
    timeout: float = MEMBER_TIMEOUT
    heard: dict[str, tuple[float, bool]] = field(default_factory=dict)

    def record(self, node: str, healthy: bool, now: float) -> None:
        self.heard[node] = (now, healthy)

    def alive(self, now: float) -> set[str]:
        return {node for node, (at, healthy) in self.heard.items() if healthy and now - at <= self.timeout}


def node_ready(node: dict) -> bool:
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def rank(node: str, ip: str) -> bytes:
    """MetalLB's ordering: every speaker sorts the candidates the same way, per address."""
    return hashlib.sha256(f"{node}#{ip}".encode()).digest()


def local_endpoint_nodes(svc: dict, slices: list[dict]) -> set[str]:
    meta = svc.get("metadata") or {}
    nodes = set()
    for s in slices:
        labels = (s.get("metadata") or {}).get("labels") or {}
        if ((s.get("metadata") or {}).get("namespace") != meta.get("namespace")
                or labels.get("kubernetes.io/service-name") != meta.get("name")):
            continue
        for endpoint in s.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready", True) and endpoint.get("nodeName"):
                nodes.add(endpoint["nodeName"])
    return nodes


def leaders(services: list[dict], nodes: list[dict], slices: list[dict], alive: set[str]) -> dict[str, str]:
    """{LoadBalancer address: the node that announces it}; addresses with no candidate are left out."""
    eligible = {(n.get("metadata") or {}).get("name") for n in nodes
                if node_ready(n) and EXCLUDE_LABEL not in ((n.get("metadata") or {}).get("labels") or {})}
    eligible &= alive
    chosen: dict[str, str] = {}
    for svc in sorted(services, key=lambda s: ((s.get("metadata") or {}).get("namespace", ""),
                                               (s.get("metadata") or {}).get("name", ""))):
        spec = svc.get("spec") or {}
        if spec.get("type") != "LoadBalancer":
            continue
        candidates = eligible
        if spec.get("externalTrafficPolicy") == "Local":
            candidates = eligible & local_endpoint_nodes(svc, slices)
        for ip in ingress_ips(svc):
            if ip in chosen or not _is_ipv4(ip) or not candidates:
                continue
            chosen[ip] = min(candidates, key=lambda node: rank(node, ip))
    return chosen


def _is_ipv4(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 4
    except ValueError:
        return False


def interface_with_address(listing: list[dict], ip: str) -> str | None:
    """`ip -j addr show` -> the interface that holds `ip`."""
    for link in listing:
        for addr in link.get("addr_info") or []:
            if addr.get("local") == ip:
                return link.get("ifname")
    return None


# ================================================================ shell: the speaker

@dataclass(frozen=True)
class SpeakerConfig:
    server: str
    node_name: str
    node_ip: str
    interface: str | None = None
    agent_health_url: str | None = None
    member_port: int = MEMBER_PORT
    health_listen: str | None = None


class HeartbeatProtocol(asyncio.DatagramProtocol):
    def __init__(self, membership: Membership, me: str):
        self.membership, self.me = membership, me

    def datagram_received(self, data: bytes, addr) -> None:
        decoded = decode_heartbeat(data)
        if decoded and decoded[0] != self.me:
            self.membership.record(*decoded, time.monotonic())


class Speaker:
    def __init__(self, config: SpeakerConfig, client):
        from netplane.client import WatchView
        self.config = config
        self.client = client
        self.view = WatchView(client, ["Service", "Node", "EndpointSlice"])
        self.membership = Membership()
        self.self_healthy = False
        self.announced: set[str] = set()
        self.garp_due: dict[str, list[float]] = {}  # address -> when to send gratuitous ARP again
        self.started = time.monotonic()
        self.sock: socket.socket | None = None
        self.mac = b""
        self.transport = None

    # -- raw ARP socket

    def open_arp_socket(self) -> None:
        from netplane import netns
        interface = self.config.interface
        if not interface:
            listing = json.loads(netns.run(["ip", "-j", "-4", "addr", "show"]).stdout or "[]")
            interface = interface_with_address(listing, self.config.node_ip)
            if interface is None:
                raise RuntimeError(f"no interface holds --node-ip {self.config.node_ip}")
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        sock.bind((interface, ETH_P_ARP))
        sock.setblocking(False)
        self.sock, self.mac = sock, sock.getsockname()[4]
        log.info("answering ARP on %s (%s)", interface, mac_text(self.mac))

    def on_arp_readable(self) -> None:
        while True:
            try:
                frame, address = self.sock.recvfrom(128)
            except (BlockingIOError, InterruptedError):
                return
            if address[2] == PACKET_OUTGOING:
                continue
            request = parse_arp(frame)
            reply = answer(request, self.mac, self.announced) if request else None
            if reply:
                self._send(reply)

    def _send(self, frame: bytes) -> None:
        try:
            self.sock.send(frame)
        except OSError as err:
            log.warning("sending ARP failed: %s", err)

    # -- membership

    async def heartbeat_loop(self, stop: asyncio.Event) -> None:
        import aiohttp
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HEARTBEAT_INTERVAL)) as http:
            while not stop.is_set():
                self.self_healthy = await self._agent_healthy(http)
                message = encode_heartbeat(self.config.node_name, self.self_healthy)
                for peer in self.peer_addresses():
                    try:
                        self.transport.sendto(message, (peer, self.config.member_port))
                    except OSError:
                        pass  # a peer's address not reachable right now: it simply is not heard
                try:
                    await asyncio.wait_for(stop.wait(), HEARTBEAT_INTERVAL)
                except asyncio.TimeoutError:
                    pass

    async def _agent_healthy(self, http) -> bool:
        if not self.config.agent_health_url:
            return True
        try:
            async with http.get(self.config.agent_health_url) as resp:
                return resp.status == 200
        except Exception:
            return False

    def peer_addresses(self) -> list[str]:
        from netplane.agent import internal_ip
        return [ip for node in self.view.list("Node")
                if (node.get("metadata") or {}).get("name") != self.config.node_name
                and (ip := internal_ip(node))]

    # -- leadership

    def alive(self, now: float) -> set[str]:
        alive = self.membership.alive(now)
        if self.self_healthy:
            alive.add(self.config.node_name)
        return alive

    def recompute(self) -> None:
        now = time.monotonic()
        if now - self.started < MEMBER_TIMEOUT:
            return  # not announcing before we could have heard the others: no two leaders at start
        chosen = leaders(self.view.list("Service"), self.view.list("Node"), self.view.list("EndpointSlice"),
                         self.alive(now))
        mine = {ip for ip, node in chosen.items() if node == self.config.node_name}
        for ip in sorted(mine - self.announced):
            log.info("announcing %s (this node is its leader now)", ip)
            self.garp_due[ip] = [now + delay for delay in GARP_REPEATS]
        for ip in sorted(self.announced - mine):
            log.info("no longer announcing %s (leader: %s)", ip, chosen.get(ip, "none"))
            self.garp_due.pop(ip, None)
        self.announced = mine
        self.send_due_gratuitous(now)
        ANNOUNCED.set(len(mine))

    def send_due_gratuitous(self, now: float) -> None:
        for ip, times in list(self.garp_due.items()):
            if times and times[0] <= now:
                for frame in gratuitous(self.mac, ip):
                    self._send(frame)
                times.pop(0)
            if not times:
                del self.garp_due[ip]

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self.open_arp_socket()
        loop.add_reader(self.sock.fileno(), self.on_arp_readable)
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: HeartbeatProtocol(self.membership, self.config.node_name),
            local_addr=(self.config.node_ip, self.config.member_port), reuse_port=True)
        await self.view.start()
        beats = asyncio.create_task(self.heartbeat_loop(stop))
        try:
            await self.view.wait_synced()
            while not stop.is_set():
                self.recompute()
                try:
                    await asyncio.wait_for(stop.wait(), RECOMPUTE_INTERVAL)
                except asyncio.TimeoutError:
                    pass
        finally:
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)
            loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.transport.close()
            await self.view.stop()


def _metrics():
    from prometheus_client import Gauge
    return Gauge("netplane_lb_announced_addresses", "LoadBalancer addresses this node answers ARP for")


ANNOUNCED = _metrics()


def parse_args(argv: list[str]) -> SpeakerConfig:
    parser = argparse.ArgumentParser(prog="netplane lb speaker",
                                     description="answer ARP for LoadBalancer addresses from one healthy node")
    parser.add_argument("--server", required=True)
    parser.add_argument("--node-name", required=True)
    parser.add_argument("--node-ip", required=True, help="this node's address on the network clients are on")
    parser.add_argument("--interface", help="where to answer ARP (default: the interface holding --node-ip)")
    parser.add_argument("--agent-health-url",
                        help="this node's agent /healthz; while it fails, this node announces nothing")
    parser.add_argument("--member-port", type=int, default=MEMBER_PORT, help="UDP port of the speakers' heartbeats")
    parser.add_argument("--health-listen")
    args = parser.parse_args(argv)
    try:
        ipaddress.IPv4Address(args.node_ip)
    except ValueError:
        parser.error(f"--node-ip {args.node_ip!r} is not an IPv4 address")
    return SpeakerConfig(args.server, args.node_name, args.node_ip, args.interface, args.agent_health_url,
                         args.member_port, args.health_listen)


def main(argv: list[str] | None = None) -> int:
    from netplane import daemon
    config = parse_args(sys.argv[1:] if argv is None else argv)
    daemon.setup_logging("lb-speaker")
    def healthy(speaker: Speaker) -> tuple[bool, str]:
        if not speaker.view.is_synced():
            return False, "starting"
        return True, f"ok: announcing {', '.join(sorted(speaker.announced)) or 'nothing'}"

    try:
        return daemon.run_client_daemon(lambda client: Speaker(config, client), config.server, "lb-speaker",
                                        config.health_listen, healthy)
    except (OSError, RuntimeError) as err:
        log.error("speaker failed: %s", err)
        return 1
