"""`python bench/cni_floor.py NAME`: the least a CPython node helper can do for an ADD (a measurement).

bench/cni.py --calibrate runs it beside the real helper (cni/helper.py), reached through the same
launcher and wire format, to show where the floor of "a Python plugin exec'd through a shebang to the
real interpreter" lies on this machine. It does only what an ADD must do to the kernel and the disk,
in straight-line code: take the IPAM lock, reserve the next IPv4 address (host-local's files), look the
bridge and its addresses up, create the veth pair with its pod end in the pod's namespace, set the
hairpin, bring the pod end up with its address and default route, answer the result JSON. Left out,
so the real helper is held to a floor it cannot go under: config validation, IPv6, creating the
bridge (done once, before timing, with `ip`), undo on failure, error JSON, the by-owner lookup, the
node socket's re-opening per request. DEL is declined (the launcher then runs it standalone).

Not part of netplane: nothing imports it, and it trusts its input.
"""
import fcntl
import json
import os
import posix
import socket
import subprocess
import sys
from _sha1 import sha1
from struct import pack, unpack_from

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from netplane.cni import forward, netlink  # noqa: E402  (netlink.setns: os.setns is Python 3.12+)

_node = None   # the node namespace's netlink socket, kept open


def attr(kind: int, data: bytes) -> bytes:
    return pack("HH", 4 + len(data), kind) + data + bytes(-len(data) % 4)


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return pack("IHHII", 16 + len(body), kind, flags, seq, 0) + body


def ifinfo(flags: int = 0) -> bytes:
    return pack("BxHiII", 0, 0, 0, flags, flags)


def new_socket():
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    sock.setsockopt(netlink.SOL_NETLINK, netlink.NETLINK_CAP_ACK, 1)
    sock.bind((0, 0))
    return sock


def replies(sock, acks: int, done: bool = False) -> list:
    """The non-ack messages until `acks` acknowledgements (and NLMSG_DONE, when `done`) have come."""
    out = []
    while acks or done:
        data, offset = sock.recv(65536), 0
        while offset < len(data):
            length, kind = unpack_from("IH", data, offset)
            if kind == netlink.NLMSG_ERROR:
                error = unpack_from("i", data, offset + 16)[0]
                if error:
                    raise OSError(-error, posix.strerror(-error))
                acks -= 1
            elif kind == netlink.NLMSG_DONE:
                done = False
            else:
                out.append(data[offset:offset + length])
            offset += length
    return out


def reserve(directory: str, first: int, owner: bytes) -> int:
    """The next free address after last_reserved_ip.0 (held under the caller's lock)."""
    try:
        value = int.from_bytes(socket.inet_aton(open(f"{directory}/last_reserved_ip.0").read().strip()), "big") + 1
    except FileNotFoundError:
        value = first
    while True:
        ip = socket.inet_ntoa(value.to_bytes(4, "big"))
        try:
            fd = posix.open(f"{directory}/{ip}", posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_CLOEXEC, 0o644)
            break
        except FileExistsError:
            value += 1
    posix.write(fd, owner)
    posix.close(fd)
    fd = posix.open(f"{directory}/last_reserved_ip.0", posix.O_WRONLY | posix.O_CREAT | posix.O_CLOEXEC, 0o644)
    posix.pwrite(fd, ip.encode(), 0)
    posix.ftruncate(fd, len(ip))
    posix.close(fd)
    return value


def add(env: dict, conf: dict) -> dict:
    global _node
    subnet, prefix = conf["ipam"]["ranges"][0][0]["subnet"].split("/")
    prefix, gateway = int(prefix), int.from_bytes(socket.inet_aton(subnet), "big") + 1
    gateway_bytes, bridge = gateway.to_bytes(4, "big"), conf["bridge"].encode()
    directory = f"{conf['ipam']['dataDir']}/{conf['name']}"
    lock = posix.open(f"{directory}/lock", posix.O_RDWR | posix.O_CREAT | posix.O_CLOEXEC, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        ip = reserve(directory, gateway + 1, env[b"CNI_CONTAINERID"] + b"\r\n" + env[b"CNI_IFNAME"]).to_bytes(4, "big")
        _node = _node or new_socket()
        _node.send(message(netlink.RTM_GETLINK, 5, 1, ifinfo() + attr(netlink.IFLA_IFNAME, bridge + b"\0"))
                   + message(netlink.RTM_GETADDR, 0x301, 2, pack("BBBBI", 0, 0, 0, 0, 0)))
        bridge_index = unpack_from("i", replies(_node, 1, done=True)[0], 20)[0]
        host = b"np-" + sha1(env[b"CNI_CONTAINERID"] + b"/" + env[b"CNI_IFNAME"]).hexdigest()[:12].encode()
        pod_ns = posix.open(env[b"CNI_NETNS"], posix.O_RDONLY | posix.O_CLOEXEC)
        host_mac, pod_mac = b"\x02" + posix.urandom(5), b"\x02" + posix.urandom(5)
        mtu = attr(netlink.IFLA_MTU, pack("I", 1500))
        peer = (ifinfo() + attr(netlink.IFLA_IFNAME, env[b"CNI_IFNAME"] + b"\0") + attr(netlink.IFLA_ADDRESS, pod_mac)
                + mtu + attr(netlink.IFLA_NET_NS_FD, pack("I", pod_ns)))
        veth = attr(netlink.IFLA_LINKINFO, attr(1, b"veth") + attr(2, attr(netlink.VETH_INFO_PEER, peer)))
        hairpin = attr(netlink.IFLA_LINKINFO, attr(4, b"bridge") + attr(5, attr(netlink.IFLA_BRPORT_MODE, b"\x01")))
        _node.send(message(netlink.RTM_NEWLINK, 0x60d, 3, ifinfo(netlink.IFF_UP) + attr(netlink.IFLA_IFNAME, host + b"\0")
                           + attr(netlink.IFLA_ADDRESS, host_mac) + mtu + attr(netlink.IFLA_MASTER, pack("I", bridge_index)) + veth)
                   + message(netlink.RTM_NEWLINK, 5, 4, ifinfo() + attr(netlink.IFLA_IFNAME, host + b"\0") + hairpin))
        replies(_node, 2)
        home = posix.open("/proc/thread-self/ns/net", posix.O_RDONLY | posix.O_CLOEXEC)
        netlink.setns(pod_ns)
        pod = new_socket()
        netlink.setns(home)
        posix.close(home)
        posix.close(pod_ns)
        pod.send(message(netlink.RTM_NEWLINK, 5, 1, ifinfo(netlink.IFF_UP) + attr(netlink.IFLA_IFNAME, env[b"CNI_IFNAME"] + b"\0"))
                 + message(netlink.RTM_NEWADDR, 0x605, 2, pack("BBBBI", 2, prefix, 0, 0, 2) + attr(2, ip) + attr(1, ip))
                 + message(netlink.RTM_NEWROUTE, 0x605, 3, pack("BBBBBBBBI", 2, 0, 0, 0, 254, 3, 0, 1, 0)
                           + attr(netlink.RTA_GATEWAY, gateway_bytes) + attr(netlink.RTA_OIF, pack("I", 2))))   # eth0 is index 2 in a new namespace (lo is 1)
        replies(pod, 3)
        pod.close()
    finally:
        posix.close(lock)
    gw = socket.inet_ntoa(gateway_bytes)
    return {"cniVersion": conf["cniVersion"],
            "interfaces": [{"name": conf["bridge"]}, {"name": host.decode(), "mac": host_mac.hex(":")},
                           {"name": env[b"CNI_IFNAME"].decode(), "mac": pod_mac.hex(":"), "sandbox": env[b"CNI_NETNS"].decode()}],
            "ips": [{"address": f"{socket.inet_ntoa(ip)}/{prefix}", "gateway": gw, "interface": 2}],
            "routes": [{"dst": "0.0.0.0/0", "gw": gw}], "dns": {}}


def prepare(conf: dict) -> None:
    """The bridge with its gateway address and the IPAM directory, once, before anything is timed."""
    subnet, prefix = conf["ipam"]["ranges"][0][0]["subnet"].split("/")
    gateway = socket.inet_ntoa((int.from_bytes(socket.inet_aton(subnet), "big") + 1).to_bytes(4, "big"))
    bridge = conf["bridge"]
    for line in (f"link add {bridge} type bridge", f"addr add {gateway}/{prefix} dev {bridge}", f"link set {bridge} up"):
        subprocess.run(["ip", *line.split()], check=True)
    os.makedirs(f"{conf['ipam']['dataDir']}/{conf['name']}", exist_ok=True)


def answer(request: bytes) -> bytes:
    length = int.from_bytes(request[:4], "little")
    env = dict(entry.split(b"=", 1) for entry in request[4:4 + length].split(b"\0") if b"=" in entry)
    if env.get(b"CNI_COMMAND") != b"ADD":
        return bytes([forward.NOT_HANDLED])
    try:
        return b"\0" + json.dumps(add(env, json.loads(request[4 + length:]))).encode()
    except OSError as e:
        return b"\x0b" + json.dumps({"code": 11, "msg": str(e)}).encode()


def main() -> None:
    name, conf = sys.argv[1], json.loads(sys.argv[2])
    prepare(conf)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(b"\0" + name.encode())
    listener.listen(256)
    print("listening", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(answer(forward.receive_all(conn)))


if __name__ == "__main__":
    main()
