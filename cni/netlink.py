"""rtnetlink from the plugin process itself: links, addresses and routes without exec'ing `ip`.

Each `ip` exec costs 2-4 ms and pyroute2's import 0.3-0.5 s; a request here costs microseconds. This
is the small part of rtnetlink the plugin uses (rtnetlink(7), linux/if_link.h, if_addr.h, rtnetlink.h):
messages are built with struct, and each is acknowledged, so the caller knows exactly which step took
effect; several may go in one write (Rtnl.requests: the kernel handles them in order and answers each),
which saves a round trip per step of a plan. `Rtnl(netns_path)` opens a socket in another network
namespace: the process enters it with setns(2) just long enough to create the socket (a netlink socket
stays in the namespace it was made in), then returns. The plugin is a short-lived single-threaded
process (the node helper serves one request at a time), so that is safe.
"""
import posix
from _socket import AF_INET, AF_INET6, AF_NETLINK, SOCK_CLOEXEC, SOCK_RAW, socket
from _struct import pack, unpack_from

from . import ipnet

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK = 10, 11, 12

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_ECHO = 0x1, 0x2, 0x4, 0x8
NLM_F_DUMP, NLM_F_EXCL, NLM_F_CREATE = 0x300, 0x200, 0x400
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200        # flags of an error message
NLMSGERR_ATTR_MSG = 1

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE = 24
RTMGRP_LINK = 0x1                                     # the multicast group of link changes

IFF_UP, IFF_PROMISC = 0x1, 0x100
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 4, 5, 10, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA = 1, 2, 4, 5
VETH_INFO_PEER = 1
IFLA_BRPORT_MODE = 4                                   # hairpin
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_NODAD = 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RTN_UNICAST = 254, 3, 0, 253, 1
CLONE_NEWNET = 0x40000000

_FAMILY = {4: AF_INET, 6: AF_INET6}
_VERSION = {AF_INET: 4, AF_INET6: 6}
_HEADER = "IHHII"     # nlmsghdr: length, type, flags, sequence, port
_IFINFO = "BxHiII"    # ifinfomsg: family, type, index, flags, change
_IFADDR = "BBBBI"     # ifaddrmsg: family, prefix length, flags, scope, index
_RTMSG = "BBBBBBBBI"  # rtmsg: family, dst len, src len, tos, table, protocol, scope, type, flags
# Large enough for any message the kernel sends us (a dump's parts are at most 32 KiB), and under
# malloc's mmap threshold (128 KiB): a bigger buffer costs an mmap, a page fault, an mremap and a
# munmap on every receive.
_RECEIVE_SIZE = 1 << 16


class NetlinkError(OSError):
    """The kernel refused a request: errno, and its words (strerror plus the extended ack, if any)."""


class Link:
    """A link as the kernel reports it (RTM_NEWLINK): index, name, kind ("bridge", "veth", ""), mac,
    flags, mtu, the index of its master (0: none) and IFLA_LINK (a veth's peer: its index in the
    peer's namespace; 0: none)."""
    __slots__ = ("index", "name", "kind", "mac", "flags", "mtu", "master", "link")

    def __init__(self, index, name, kind, mac, flags, mtu, master, link=0):
        self.index, self.name, self.kind, self.mac = index, name, kind, mac
        self.flags, self.mtu, self.master, self.link = flags, mtu, master, link


# ---- attributes ----------------------------------------------------------------------------------

def attr(kind: int, data: bytes) -> bytes:
    return pack("HH", 4 + len(data), kind) + data + bytes(-len(data) % 4)


def attr_str(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, pack("I", value))


def attrs(data: bytes, offset: int = 0) -> dict:
    """{type: payload} of the attributes from `offset` on (nested ones are parsed by the caller)."""
    out = {}
    while offset + 4 <= len(data):
        length, kind = unpack_from("HH", data, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


def _text(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode(errors="replace")


def mac_text(data: bytes) -> str:
    return ":".join(f"{b:02x}" for b in data)


def mac_bytes(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return pack(_IFINFO, 0, 0, index, flags, change)


# ---- the socket ----------------------------------------------------------------------------------

class Rtnl:
    """A NETLINK_ROUTE socket in the caller's network namespace, or in the one at `netns_path`."""

    def __init__(self, netns_path: str | None = None):
        self.seq = 0
        self.indexes = {}
        if netns_path is None:
            self.sock = _open_socket()
        else:
            with NetnsFd(netns_path) as target:
                self.sock = _socket_in(target.fd)

    def close(self) -> None:
        self.sock.close()

    def request(self, msg_type: int, body: bytes, flags: int = 0) -> list:
        """Send one request and return the payloads of its replies (a dump's parts, a GET's answer, an
        echo); NetlinkError when the kernel refuses it."""
        (outcome,) = self.requests([(msg_type, body, flags)])
        if isinstance(outcome, NetlinkError):
            raise outcome
        return outcome

    def requests(self, messages: list) -> list:
        """Send (type, body, flags) requests in one write; for each, in order, the payloads of its
        replies or the NetlinkError it was refused with. The kernel handles them one after another
        and answers every one (a refused request does not stop the next). At most one dump, last."""
        first = self.seq + 1
        wire = []
        for msg_type, body, flags in messages:
            self.seq += 1
            flags |= NLM_F_REQUEST if flags & NLM_F_DUMP == NLM_F_DUMP else NLM_F_REQUEST | NLM_F_ACK
            wire.append(pack(_HEADER, 16 + len(body), msg_type, flags, self.seq, 0) + body)
        self.sock.send(b"".join(wire))
        replies = [[] for _ in messages]
        outcomes = [None] * len(messages)
        waiting = len(messages)
        while waiting:
            data = self.sock.recv(_RECEIVE_SIZE)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, msg_flags, seq, _ = unpack_from(_HEADER, data, offset)
                if length < 16:
                    break
                payload = data[offset + 16:offset + length]
                offset += (length + 3) & ~3
                at = seq - first
                if not 0 <= at < len(messages) or outcomes[at] is not None:
                    continue   # not one of these requests (a late answer to an earlier one)
                if kind == NLMSG_ERROR or kind == NLMSG_DONE:
                    error = -unpack_from("i", payload)[0] if len(payload) >= 4 else 0
                    outcomes[at] = NetlinkError(error, _error_words(error, payload, msg_flags)) if error else replies[at]
                    waiting -= 1
                else:
                    replies[at].append(payload)
        return outcomes

    # -- links --

    def link(self, name: str = "", index: int = 0) -> Link | None:
        """The link called `name` (or with that index), or None."""
        try:
            (payload,) = self.request(RTM_GETLINK, ifinfo(index) + (attr_str(IFLA_IFNAME, name) if name else b""))
        except NetlinkError as e:
            if e.errno == 19:   # ENODEV
                return None
            raise
        found = parse_link(payload)
        self.indexes[found.name] = found.index
        return found

    def links(self) -> list:
        return [parse_link(p) for p in self.request(RTM_GETLINK, ifinfo(), NLM_F_DUMP)]

    def index(self, name: str) -> int:
        """The index of link `name`, asked once per socket (a plan names one link line after line)."""
        if name not in self.indexes:
            if self.link(name) is None:
                raise NetlinkError(19, f'Cannot find device "{name}"')
        return self.indexes[name]

    def delete_link(self, name: str) -> None:
        self.indexes.pop(name, None)
        self.request(*delete_link_message(name))

    # -- addresses and routes --

    def addresses(self, index: int) -> list:
        """The addresses on link `index`, as ipnet.Interface values."""
        out = []
        for payload in self.request(RTM_GETADDR, pack(_IFADDR, 0, 0, 0, 0, index), NLM_F_DUMP):
            family, prefixlen, _, _, at = unpack_from(_IFADDR, payload)
            if at != index or family not in _VERSION:
                continue
            found = attrs(payload, 8)
            raw = found.get(IFA_LOCAL) or found.get(IFA_ADDRESS)
            if raw:
                out.append(ipnet.Interface(ipnet.Address(_VERSION[family], int.from_bytes(raw, "big")), prefixlen))
        return out


# ---- requests, as (type, body, flags) for Rtnl.request / Rtnl.requests -------------------------

def new_link_message(name: str, kind: str, mac: str | None = None, mtu: int | None = None, master: int = 0,
                     flags: int = 0, info_data: bytes = b"", echo: bool = False) -> tuple:
    """Create a link; with `echo`, a kernel that honours NLM_F_ECHO here (6.3+) answers with the new
    link (a veth's: with its peer's index), an older one only acknowledges."""
    body = ifinfo(flags=flags, change=flags) + link_attrs(name, mac, mtu)
    if master:
        body += attr_u32(IFLA_MASTER, master)
    body += attr(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, kind) + (attr(IFLA_INFO_DATA, info_data) if info_data else b""))
    return RTM_NEWLINK, body, NLM_F_CREATE | NLM_F_EXCL | (NLM_F_ECHO if echo else 0)


def set_link_message(name: str, flags: int, change: int, extra: bytes = b"") -> tuple:
    """Change flags (IFF_UP, IFF_PROMISC: the bits in `change` become those in `flags`), and attributes
    given in `extra`, of an existing link."""
    return RTM_NEWLINK, ifinfo(flags=flags, change=change) + attr_str(IFLA_IFNAME, name) + extra, 0


def delete_link_message(name: str) -> tuple:
    return RTM_DELLINK, ifinfo() + attr_str(IFLA_IFNAME, name), 0


def address_message(add: bool, index: int, address, nodad: bool = False) -> tuple:
    """Add (or delete) an ipnet.Interface on link `index`."""
    packed = address.ip.packed
    body = pack(_IFADDR, _FAMILY[address.version], address.prefixlen, IFA_F_NODAD if nodad else 0,
                RT_SCOPE_UNIVERSE, index) + attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed)
    return (RTM_NEWADDR, body, NLM_F_CREATE | NLM_F_EXCL) if add else (RTM_DELADDR, body, 0)


def route_message(index: int, dst, gateway=None) -> tuple:
    """A main-table unicast route to the ipnet.Network `dst` out of link `index`, via `gateway`."""
    scope = RT_SCOPE_UNIVERSE if gateway is not None else RT_SCOPE_LINK
    body = pack(_RTMSG, _FAMILY[dst.version], dst.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0)
    if dst.prefixlen:
        body += attr(RTA_DST, dst.network_address.packed)
    if gateway is not None:
        body += attr(RTA_GATEWAY, gateway.packed)
    body += attr_u32(RTA_OIF, index)
    return RTM_NEWROUTE, body, NLM_F_CREATE | NLM_F_EXCL


def link_attrs(name: str, mac: str | None, mtu: int | None, netns_fd: int = -1) -> bytes:
    out = attr_str(IFLA_IFNAME, name)
    if mac:
        out += attr(IFLA_ADDRESS, mac_bytes(mac))
    if mtu:
        out += attr_u32(IFLA_MTU, mtu)
    if netns_fd >= 0:
        out += attr_u32(IFLA_NET_NS_FD, netns_fd)
    return out


def veth_peer(name: str, mac: str | None, mtu: int | None, netns_fd: int) -> bytes:
    """IFLA_INFO_DATA of a veth: its peer, made directly in the namespace `netns_fd` refers to."""
    return attr(VETH_INFO_PEER, ifinfo() + link_attrs(name, mac, mtu, netns_fd))


def bridge_port_hairpin(on: bool) -> bytes:
    """The attribute that sets hairpin mode on a bridge port (`ip link set X type bridge_slave hairpin on`)."""
    return attr(IFLA_LINKINFO, attr_str(IFLA_INFO_SLAVE_KIND, "bridge")
                + attr(IFLA_INFO_SLAVE_DATA, attr(IFLA_BRPORT_MODE, bytes([1 if on else 0]))))


def parse_link(payload: bytes) -> Link:
    _, _, index, flags, _ = unpack_from(_IFINFO, payload)
    found = attrs(payload, 16)
    kind = attrs(found[IFLA_LINKINFO]).get(IFLA_INFO_KIND, b"") if IFLA_LINKINFO in found else b""
    master = unpack_from("I", found[IFLA_MASTER])[0] if IFLA_MASTER in found else 0
    mtu = unpack_from("I", found[IFLA_MTU])[0] if IFLA_MTU in found else 0
    link = unpack_from("I", found[IFLA_LINK])[0] if IFLA_LINK in found else 0
    return Link(index, _text(found.get(IFLA_IFNAME, b"")), _text(kind), mac_text(found.get(IFLA_ADDRESS, b"")),
                flags, mtu, master, link)


def _error_words(error: int, payload: bytes, msg_flags: int) -> str:
    words = posix.strerror(error)
    if msg_flags & NLM_F_ACK_TLVS and len(payload) >= 20:
        original_length = unpack_from("I", payload, 4)[0]
        tlvs = attrs(payload, 20 if msg_flags & NLM_F_CAPPED else 4 + original_length)
        if NLMSGERR_ATTR_MSG in tlvs:
            words += f" ({_text(tlvs[NLMSGERR_ATTR_MSG])})"
    return words


def _open_socket(groups: int = 0):
    sock = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE)
    # Short acks with the kernel's words for an error; dumps filtered by the kernel (the address dump
    # for one link then skips the link-local address of every pod's host veth).
    for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK):
        try:
            sock.setsockopt(SOL_NETLINK, option, 1)
        except OSError:
            pass   # an old kernel: plain errors, full echoes, unfiltered dumps (filtered here too)
    sock.bind((0, groups))
    return sock


# ---- deleting a link without waiting for the kernel's clean-up -------------------------------------

def delete_link_detached(rtnl: Rtnl, index: int) -> None:
    """Delete link `index` (a veth: both ends) and return once the kernel has unregistered it.

    Unregistering is quick: the link leaves every listing, its addresses and routes go, the bridge lets
    go of the port, and the name is free again; the kernel then announces RTM_DELLINK. What follows in
    the same syscall is clean-up nobody can observe (an RCU barrier, waiting for references, freeing):
    ~15-20 ms for a veth, paid by whoever sent the request. So a forked child sends it, with stdio on
    /dev/null and no other descriptor (not the IPAM lock), and this process waits only for the
    announcement; the child finishes the syscall and exits on its own. The child sends on a socket of
    its own, opened before the fork: on `rtnl`, which this process goes on using, the two would read
    each other's answers (same port, same sequence numbers). The link is in the caller's namespace,
    where `rtnl` is too. NetlinkError when the kernel refuses (ENODEV: already gone)."""
    import select
    listener = _open_socket(RTMGRP_LINK)     # subscribed before the request, so the event cannot be missed
    child_socket = Rtnl()
    result_r, result_w = posix.pipe()
    pid = posix.fork()
    if pid == 0:
        _delete_in_child(child_socket, index, result_w)
    posix.close(result_w)
    child_socket.close()
    try:
        while True:
            ready, _, _ = select.select([listener, result_r], [], [])
            if listener in ready and _announces_deletion(listener, index, rtnl):
                return
            if result_r in ready:
                answer = posix.read(result_r, 4)
                error = int.from_bytes(answer, "little") if len(answer) == 4 else None
                if error:
                    raise NetlinkError(error, posix.strerror(error))
                if error == 0 or rtnl.link(index=index) is None:   # done, or the child died and it is gone
                    return
                raise NetlinkError(5, f"deleting link {index}: the process doing it died")   # EIO
    finally:
        listener.close()
        posix.close(result_r)


def _announces_deletion(listener, index: int, rtnl: Rtnl) -> bool:
    try:
        data = listener.recv(_RECEIVE_SIZE)
    except OSError:   # ENOBUFS: events were lost; ask instead
        return rtnl.link(index=index) is None
    offset = 0
    while offset + 32 <= len(data):
        length, kind = unpack_from("IH", data, offset)
        family, _, at = unpack_from("BxHi", data, offset + 16)
        if kind == RTM_DELLINK and family == 0 and at == index:
            return True
        offset += max(16, (length + 3) & ~3)
    return False


def _delete_in_child(rtnl: Rtnl, index: int, result_w: int) -> None:
    """In the forked child: send the deletion, report its errno (0: done) on result_w, exit."""
    try:
        null = posix.open("/dev/null", posix.O_RDWR)
        for fd in (0, 1, 2):
            posix.dup2(null, fd)   # the runtime waits for EOF on our stdout and stderr: not for this child
        keep = sorted((rtnl.sock.fileno(), result_w))
        posix.closerange(3, keep[0])
        posix.closerange(keep[0] + 1, keep[1])
        posix.closerange(keep[1] + 1, 1 << 16)
        error = 0
        try:
            rtnl.request(RTM_DELLINK, ifinfo(index))
        except NetlinkError as e:
            error = e.errno
        try:
            posix.write(result_w, error.to_bytes(4, "little"))
        except OSError:
            pass    # the parent is long gone: as intended
    finally:
        posix._exit(0)


# ---- network namespaces --------------------------------------------------------------------------

class NetnsFd:
    """`with NetnsFd(path) as ns:` an open descriptor (ns.fd) of the network namespace at `path`."""

    def __init__(self, path: str):
        self.path = path
        self.fd = -1

    def __enter__(self) -> "NetnsFd":
        try:
            self.fd = posix.open(self.path, posix.O_RDONLY | posix.O_CLOEXEC)
        except OSError as e:
            raise NetlinkError(e.errno, f"cannot open network namespace {self.path}: {e.strerror}")
        return self

    def __exit__(self, *exc) -> None:
        posix.close(self.fd)


class InNamespace:
    """`with InNamespace(fd):` the calling thread in the network namespace `fd` refers to, and back
    in its own after the block. A thread that cannot get back would act in the wrong namespace from
    then on (even an undo), so the process stops instead."""

    def __init__(self, netns_fd: int):
        self.netns_fd = netns_fd
        self.home = -1

    def __enter__(self) -> "InNamespace":
        self.home = posix.open("/proc/thread-self/ns/net", posix.O_RDONLY | posix.O_CLOEXEC)
        try:
            setns(self.netns_fd)
        except BaseException:
            posix.close(self.home)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            setns(self.home)
        except NetlinkError as e:
            posix.write(2, f"netplane: cannot return to this thread's network namespace: {e}\n".encode())
            posix._exit(1)
        finally:
            posix.close(self.home)


def _socket_in(netns_fd: int):
    """A netlink socket made inside the namespace `netns_fd` (it stays there); the thread returns."""
    with InNamespace(netns_fd):
        return _open_socket()


_setns_function = None


def setns(fd: int) -> None:
    """setns(fd, CLONE_NEWNET) for the calling thread, through libc (os.setns is Python 3.12+;
    ctypes itself costs ~3 ms of imports, the _ctypes core ~0.4 ms). Used through InNamespace."""
    global _setns_function
    if _setns_function is None:
        import _ctypes

        class CInt(_ctypes._SimpleCData):
            _type_ = "i"

        class Function(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = CInt

        _setns_function = Function(_ctypes.dlsym(_ctypes.dlopen(None), "setns")), _ctypes.get_errno
    function, get_errno = _setns_function
    if function(fd, CLONE_NEWNET) != 0:
        error = get_errno()
        raise NetlinkError(error, f"setns: {posix.strerror(error)}")
