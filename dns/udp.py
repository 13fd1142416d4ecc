"""UDP on a thread of its own: batches of datagrams per system call, replies from a cache of whole replies.

asyncio's datagram transport costs a recvfrom, a sendto, a callback and several Python objects per
query; the kernel's own per-datagram work is much smaller than that. Here one thread loops on
recvmmsg(2) (up to BATCH datagrams per call; MSG_WAITFORONE: block for the first, take whatever else
is queued) and sendmmsg(2) (all the replies of a batch in one call), through ctypes, with buffers that
are allocated once:

    receive slot i:  the query bytes, the client's address (the kernel writes it)
    send slot i:     iovec 0 = the first two bytes of receive slot i (the query's id, never copied),
                     iovec 1 = the reply after its id;  the address = receive slot i's address

A query is answered from `Table.replies`: the raw query bytes after the id -> the reply bytes after
the id. Those bytes hold everything the reply depends on (flags, the question with its letter case,
the EDNS0 buffer size), so a hit is one bytes slice, one dict lookup and one copy. The cache belongs
to the Table, so a zone rebuild (a new Table) starts an empty one: nothing to invalidate. Forwarded
answers are kept there too, each until its remaining TTL would change (a second at most).

A miss takes the ordinary path (wire.respond through DnsServer) on this thread; only a forwarded name
that is not cached goes to the event loop, which sends its reply with a plain sendto. The GIL is
released inside every system call, so the event loop (TCP, health, the API watch) runs meanwhile.
Linux only (recvmmsg/sendmmsg).
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import socket
import threading
import time
from time import monotonic, perf_counter

from netplane.dns import wire
from netplane.dns.metrics import DnsMetrics

log = logging.getLogger("dns")

BATCH = 64  # datagrams per system call
RECV_SLOT = 4096  # bytes per query; a larger datagram is cut short by the kernel, and dropped here
SEND_SLOT = 4096  # bytes per reply (UDP replies stay within wire.MAX_UDP_SIZE)
NAME_SLOT = 32  # a sockaddr_in6 is 28 bytes
MAX_REPLIES = 65536  # cached replies per table: distinct questions x letter case x flags
MSG_WAITFORONE = 0x10000
MSG_TRUNC = 0x20


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(_Iovec)),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


_MMSG_UINTS = ctypes.sizeof(_Mmsghdr) // 4  # the arrays are read as uint32 views: msg_len's index
_LEN_AT = _Mmsghdr.len.offset // 4
_FLAGS_AT = (_Mmsghdr.hdr.offset + _Msghdr.flags.offset) // 4

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]


class Buffers:
    """The receive and send slots of one batch, and Python views to read and fill them without
    creating ctypes objects per datagram."""

    def __init__(self, family: int, size: int = BATCH):
        self.size = size
        self.received = ctypes.create_string_buffer(size * RECV_SLOT)
        self.replies = ctypes.create_string_buffer(size * SEND_SLOT)
        self.names = ctypes.create_string_buffer(size * NAME_SLOT)
        self.recv_iov = (_Iovec * size)()
        self.send_iov = (_Iovec * (2 * size))()
        self.recv_msgs = (_Mmsghdr * size)()
        self.send_msgs = (_Mmsghdr * size)()
        namelen = 28 if family == socket.AF_INET6 else 16
        for i in range(size):
            name = ctypes.addressof(self.names) + i * NAME_SLOT
            query = ctypes.addressof(self.received) + i * RECV_SLOT
            self.recv_iov[i].base, self.recv_iov[i].len = query, RECV_SLOT
            self.send_iov[2 * i].base, self.send_iov[2 * i].len = query, 2  # the query's own id
            self.send_iov[2 * i + 1].base = ctypes.addressof(self.replies) + i * SEND_SLOT
            for msgs, iov, count in ((self.recv_msgs, self.recv_iov, 1), (self.send_msgs, self.send_iov, 2)):
                hdr = msgs[i].hdr
                hdr.name, hdr.namelen = name, namelen
                hdr.iov = ctypes.cast(ctypes.byref(iov, ctypes.sizeof(_Iovec) * i * count), ctypes.POINTER(_Iovec))
                hdr.iovlen = count
        self.query_view = memoryview(self.received).cast("B")
        self.reply_view = memoryview(self.replies).cast("B")
        self.name_view = memoryview(self.names).cast("B")
        self.recv_words = memoryview(self.recv_msgs).cast("B").cast("I")
        self.send_iov_words = memoryview(self.send_iov).cast("B").cast("Q")  # [base, len] per iovec
        # per slot, where things are in those views: (slot, query offset, its length, reply offset,
        # its length): computed once, not per datagram
        self.plan = [(i, i * RECV_SLOT, i * _MMSG_UINTS + _LEN_AT, i * SEND_SLOT, (2 * i + 1) * 2 + 1)
                     for i in range(size)]

    def put(self, slot: int, query: bytes) -> None:
        """Fill receive slot `slot` as the kernel would (for tests)."""
        offset = slot * RECV_SLOT
        self.query_view[offset:offset + len(query)] = query
        self.recv_words[slot * _MMSG_UINTS + _LEN_AT] = len(query)
        self.recv_words[slot * _MMSG_UINTS + _FLAGS_AT] = 0

    def query(self, slot: int) -> bytes:
        offset = slot * RECV_SLOT
        return self.query_view[offset:offset + self.recv_words[slot * _MMSG_UINTS + _LEN_AT]].tobytes()

    def reply(self, slot: int) -> bytes:
        """The datagram that send slot `slot` holds: the query's id and the reply after it."""
        length = self.send_iov_words[(2 * slot + 1) * 2 + 1]
        offset = slot * SEND_SLOT
        return self.query(slot)[:2] + self.reply_view[offset:offset + length].tobytes()

    def address(self, slot: int, family: int) -> tuple:
        """The client's address of receive slot `slot`, as socket.sendto takes it."""
        name = self.name_view[slot * NAME_SLOT:(slot + 1) * NAME_SLOT].tobytes()
        port = (name[2] << 8) | name[3]
        if family == socket.AF_INET6:
            return socket.inet_ntop(family, name[8:24]), port
        return socket.inet_ntop(family, name[4:8]), port


class BatchAnswerer:
    """Answers the queries in a Buffers' receive slots into its send slots; sockets are not its
    business. A miss asks the server (DnsServer.cached_reply, then .answer) on this thread."""

    def __init__(self, server, buffers: Buffers, metrics: DnsMetrics, clock=monotonic):
        self.server = server
        self.buffers = buffers
        self.metrics = metrics  # this thread's own counters: no other thread writes them
        self.clock = clock  # for the validity of cached forwarded answers

    def answer(self, count: int, deferred) -> list[int]:
        """Fill send slots for receive slots 0..count-1; the slots that have a reply, in order.
        `deferred(reply_coroutine, slot, started)` takes the forwarded names not in the cache."""
        b = self.buffers
        table = self.server.table  # one table for the whole batch, even if a rebuild lands meanwhile
        cached = table.replies.get
        queries, replies, words, iov = b.query_view, b.reply_view, b.recv_words, b.send_iov_words
        queries_by_kind = self.metrics.queries
        now = self.clock()
        started = perf_counter()
        ready, cache_hits = [], 0
        for slot, at, len_at, out, reply_len_at in b.plan[:count]:
            size = words[len_at]
            entry = cached(queries[at + 2:at + size].tobytes()) if size > 12 else None
            if entry is None or entry[2] <= now:
                entry = self._miss(table, slot, now, started, deferred)
                if entry is None:
                    continue
            body, kind = entry[0], entry[1]
            replies[out:out + len(body)] = body
            iov[reply_len_at] = len(body)
            queries_by_kind[kind] = queries_by_kind.get(kind, 0) + 1
            cache_hits += entry[3]
            ready.append(slot)
        self.metrics.cache_hits += cache_hits
        self.metrics.udp_batches += 1
        self.metrics.observe(perf_counter() - started, len(ready))
        return ready

    def _miss(self, table: wire.Table, slot: int, now: float, started: float, deferred):
        """(reply after id, metrics key, valid until, forwarded 0/1) for receive slot `slot`, kept in
        the table's cache when it may be; None when there is nothing to send now."""
        b = self.buffers
        if b.recv_words[slot * _MMSG_UINTS + _FLAGS_AT] & MSG_TRUNC:
            self.metrics.dropped += 1  # longer than RECV_SLOT: no real query is; not worth a reply
            return None
        query = b.query(slot)
        try:
            found = self.server.cached_reply(table, query)
            if found is not None:
                reply, valid, forwarded = found
                entry = (reply[2:], (query_type(reply), reply[3] & 0xF, "udp"), now + valid, forwarded)
                if len(table.replies) >= MAX_REPLIES:  # a flood of distinct questions: start over
                    table.replies.clear()
                table.replies[query[2:]] = entry
                return entry
            reply = self.server.answer(query, False)
        except Exception:  # a bug must cost one query, not the server
            log.exception("query failed")
            reply = wire.error_reply(query, 2)
        if reply is None:
            self.metrics.dropped += 1
            return None
        if reply.__class__ is not bytes:
            deferred(reply, slot, started)
            return None
        if len(reply) - 2 > SEND_SLOT:
            self.metrics.dropped += 1
            return None
        return reply[2:], (query_type(reply), reply[3] & 0xF, "udp"), now, 0


def query_type(message: bytes) -> int:
    """The question type of a message with one plain question (0 when it cannot be read)."""
    end = message.find(0, 12)
    return (message[end + 1] << 8) | message[end + 2] if 0 < end < len(message) - 2 else 0


class UdpListener:
    """The UDP socket and the thread that serves it."""

    def __init__(self, server, host: str, port: int, reuse_port: bool = False):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.family = family
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if reuse_port:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.server = server
        self.metrics = DnsMetrics()
        self.buffers = Buffers(family)
        self.answerer = BatchAnswerer(server, self.buffers, self.metrics)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="dns-udp", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread out of recvmmsg (Linux, UDP too)
        except OSError:
            pass
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        self.sock.close()

    def _run(self) -> None:
        fd, b = self.sock.fileno(), self.buffers
        recv_msgs, send_msgs = ctypes.addressof(b.recv_msgs), ctypes.addressof(b.send_msgs)
        while not self.stopping:
            count = _recvmmsg(fd, recv_msgs, b.size, MSG_WAITFORONE, None)
            if count <= 0:
                if count < 0 and not self.stopping:
                    self._receive_failed(ctypes.get_errno())
                continue
            try:
                ready = self.answerer.answer(count, self._defer)
                self._send(fd, send_msgs, ready)
            except Exception:
                log.exception("udp batch failed")  # a bug must cost one batch, not the server

    def _receive_failed(self, code: int) -> None:
        if code in (errno.EINTR, errno.EAGAIN, errno.ECONNREFUSED):
            return  # a signal; or an ICMP error about an earlier client: the next call goes on
        log.error("recvmmsg failed: %s", os.strerror(code))
        time.sleep(0.1)  # not a hot loop of errors, should one persist

    def _send(self, fd: int, send_msgs: int, ready: list[int]) -> None:
        """sendmmsg for each run of consecutive slots (a batch with no misses is a single run)."""
        size = ctypes.sizeof(_Mmsghdr)
        start = 0
        while start < len(ready):
            end = start + 1
            while end < len(ready) and ready[end] == ready[end - 1] + 1:
                end += 1
            sent = _sendmmsg(fd, send_msgs + ready[start] * size, end - start, 0)
            if sent <= 0:  # the first datagram failed (e.g. the client's address is unreachable)
                self.metrics.dropped += 1
                sent = 1
            start += sent

    def _defer(self, reply, slot: int, started: float) -> None:
        """A forwarded name: finish it on the event loop and send from there."""
        address = self.buffers.address(slot, self.family)
        sock, metrics = self.sock, self.server.metrics

        def send(message: bytes | None) -> None:
            if message and not self.stopping:
                try:
                    sock.sendto(message, socket.MSG_DONTWAIT, address)
                except OSError:
                    metrics.dropped += 1
                    return
                metrics.answered(message, "udp", started)
        try:
            self.loop.call_soon_threadsafe(self.server.spawn, reply, send)
        except RuntimeError:  # the loop is closing: nobody will answer this one
            reply.close()
