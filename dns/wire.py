"""DNS messages in and out: answers encoded once, replies assembled from bytes on the hot path.

An answer is encoded with dnslib once, for the lower-case question, into a Tail: the header counts
and everything after the question. A reply is then `query id + flags + counts + the query's own
question bytes + tail body`. Because dnslib compresses owner names into pointers at the question
(offset 12), splicing in the client's question echoes its letter case in every owner name for free
(0x20-safe, like CoreDNS).

Table maps (lower-cased wire name, qtype) to its Tail, encoded on first use and kept; a Table for a
rebuilt zone keeps the Tails whose answers did not change. It is swapped as a whole, so there is
nothing to invalidate. It also holds the UDP thread's whole-reply cache (`replies`, see udp.py), which
a new Table starts empty.

respond() is pure: bytes in, and either reply bytes, None (drop), or a Forward / Chase request that
the server resolves upstream before finishing with Tail.reply().
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from dnslib import (AAAA, CNAME, DNSError, DNSHeader, DNSQuestion, DNSRecord, NS, PTR, QTYPE, RR,
                    SOA, SRV, TXT, A)

from netplane.dns.zone import (FORMERR, NOERROR, NOTIMP, REFUSED, SERVFAIL, Answer, Record, Zone,
                               lookup)

QTYPE_OPT, QTYPE_AXFR, QTYPE_IXFR = 41, 252, 251
BADVERS = 16
MAX_UDP_SIZE = 1232  # what we advertise and never exceed over UDP (DNS flag day 2020)
MAX_TCP_SIZE = 65535
MAX_ENCODED = 200_000  # encoded answers kept per table (names x types asked)
OPT_HEAD = b"\x00\x00\x29"  # root owner name, type OPT


def opt_record(udp_size: int = MAX_UDP_SIZE) -> bytes:
    """Our EDNS0 OPT record: root name, type 41, class = UDP size, version 0, no flags, no options."""
    return OPT_HEAD + struct.pack(">HIH", udp_size, 0, 0)


OPT_RR = opt_record()


def type_name(qtype: int) -> str:
    return QTYPE.forward.get(qtype, f"TYPE{qtype}")


def encode_name(name: str) -> bytes:
    """Wire form of a name (lower case): the key of Table."""
    name = name.rstrip(".")
    if not name:
        return b"\x00"
    out = bytearray()
    for label in name.encode().split(b"."):
        out.append(len(label))
        out += label
    out.append(0)
    return bytes(out).lower()


# ---------------------------------------------------------------------------------------------
# Encoded answers


def _rdata(record: Record):
    if record.rtype == "A":
        return A(record.data)
    if record.rtype == "AAAA":
        return AAAA(record.data)
    if record.rtype == "SRV":
        prio, weight, port, target = record.data.split()
        return SRV(int(prio), int(weight), int(port), target)
    if record.rtype == "TXT":
        return TXT(record.data.strip('"'))
    if record.rtype == "SOA":
        mname, rname, *times = record.data.split()
        return SOA(mname, rname, tuple(int(t) for t in times))
    cls = {"PTR": PTR, "CNAME": CNAME, "NS": NS}[record.rtype]
    return cls(record.data)


def to_rr(record: Record) -> RR:
    return RR(record.name + ".", getattr(QTYPE, record.rtype), ttl=record.ttl, rdata=_rdata(record))


class Tail:
    """One answer, encoded: header flags and counts, and the bytes after the question, in four forms
    (plain, with our OPT, truncated, truncated with OPT) so a reply is a join of four byte strings.
    `answer` is the zone Answer it encodes (None for forwarded answers), so a rebuilt Table can keep
    this Tail when the new zone gives the same Answer."""

    __slots__ = ("rcode", "heads", "bodies", "sizes", "qname", "answer", "records")

    def __init__(self, rcode: int, counts: tuple[int, int, int], body: bytes,
                 authoritative: bool = True, truncated: bool = False):
        self.rcode = rcode
        self.qname = ""
        self.answer = None
        an, ns, ar = counts
        self.records = an + ns + ar
        self.bodies = (body, body + OPT_RR, b"", OPT_RR)
        self.sizes = tuple(len(b) for b in self.bodies)
        forms = ((an, ns, ar, truncated), (an, ns, ar + 1, truncated), (0, 0, 0, True), (0, 0, 1, True))
        # heads[form][rd | cd << 1]: flags (QR, AA, TC, RD echoed; RA; CD echoed; rcode) + counts
        self.heads = tuple(
            tuple(bytes((0x80 | (0x04 if authoritative else 0) | (0x02 if tc else 0) | (echo & 1),
                         0x80 | (0x10 if echo & 2 else 0) | rcode))
                  + struct.pack(">HHHH", 1, f_an, f_ns, f_ar)
                  for echo in range(4))
            for f_an, f_ns, f_ar, tc in forms)

    @classmethod
    def from_rrs(cls, qname: str, qtype: int, rcode: int, answer, authority, additional,
                 authoritative: bool = True, truncated: bool = False) -> "Tail":
        """Encode dnslib RRs after the lower-case question `qname`."""
        message = DNSRecord(DNSHeader(qr=1, rcode=rcode), q=DNSQuestion(qname.lower(), qtype))
        message.rr, message.auth, message.ar = list(answer), list(authority), list(additional)
        packed = bytes(message.pack())
        question_end = 12 + len(encode_name(qname)) + 4
        return cls(rcode, (len(answer), len(authority), len(additional)), packed[question_end:],
                   authoritative, truncated)

    @classmethod
    def from_answer(cls, qname: str, qtype: int, answer: Answer) -> "Tail":
        tail = cls.from_rrs(qname, qtype, answer.rcode, [to_rr(r) for r in answer.answer],
                            [to_rr(r) for r in answer.authority], [to_rr(r) for r in answer.additional])
        tail.qname, tail.answer = qname, answer
        return tail

    def lowered(self, seconds: int) -> "Tail":
        """This answer with every record's TTL lowered by `seconds` (not below 0): a cached forwarded
        answer as it ages, patched in place of encoding it again (the sizes do not change)."""
        body = bytearray(self.bodies[0])
        for at in ttl_offsets(body, self.records):
            ttl = int.from_bytes(body[at:at + 4], "big")
            body[at:at + 4] = max(0, ttl - seconds).to_bytes(4, "big")
        tail = object.__new__(Tail)
        tail.rcode, tail.heads, tail.sizes, tail.qname, tail.answer, tail.records = (
            self.rcode, self.heads, self.sizes, self.qname, self.answer, self.records)
        body = bytes(body)
        tail.bodies = (body, body + OPT_RR, b"", OPT_RR)
        return tail

    def reply(self, query: bytes, question_end: int, limit: int, edns: bool) -> bytes:
        """The reply to `query` (whose question ends at `question_end`); truncated (TC, no records)
        when it would exceed `limit` bytes."""
        form = 1 if edns else 0
        if question_end + self.sizes[form] > limit:
            form += 2
        echo = (query[2] & 1) | ((query[3] >> 3) & 2)
        return b"".join((query[:2], self.heads[form][echo], query[12:question_end], self.bodies[form]))


def ttl_offsets(body: bytes, count: int) -> list[int]:
    """Where the TTL field of each of the `count` records at the start of `body` is. An owner name
    is labels up to a zero byte, or up to a compression pointer (two bytes)."""
    offsets, at = [], 0
    for _ in range(count):
        while body[at] and body[at] < 0xC0:
            at += 1 + body[at]
        at += 2 if body[at] else 1  # the pointer, or the root label
        offsets.append(at + 4)  # after type and class
        at += 10 + ((body[at + 8] << 8) | body[at + 9])  # type, class, TTL, rdlength, rdata
    return offsets


class Table:
    """Encoded answers of one zone: (wire name, qtype) -> Tail, filled on first use.

    Encoding costs far more than answering (dnslib: ~100 us per answer), so answers are encoded when
    first asked and kept; a Table built for a new zone keeps every Tail of the previous one whose
    Answer is unchanged, so a rebuild re-encodes only what changed, and costs one lookup per kept
    answer instead of an encoding per name."""

    def __init__(self, zone: Zone, previous: "Table | None" = None):
        self.zone = zone
        self.entries: dict[bytes, dict[int, Tail]] = {}
        self.size = 0
        # query bytes after the id -> (reply after the id, metrics key, valid until, forwarded 0/1);
        # written by the UDP thread only
        self.replies: dict[bytes, tuple[bytes, tuple, float, int]] = {}
        if previous is not None and previous.zone.synced and zone.synced:
            self._keep_unchanged(previous)

    def _keep_unchanged(self, previous: "Table") -> None:
        # list() snapshots: the previous table may still be answering (and growing) meanwhile
        for key, by_type in list(previous.entries.items()):
            for qtype, tail in list(by_type.items()):
                if tail.answer is not None and lookup(self.zone, tail.qname, type_name(qtype)) == tail.answer:
                    self.remember(key, qtype, tail)

    def find(self, key: bytes, qtype: int) -> Tail | None:
        entry = self.entries.get(key)
        return entry.get(qtype) if entry is not None else None

    def remember(self, key: bytes, qtype: int, tail: Tail) -> None:
        if self.size >= MAX_ENCODED:  # a flood of distinct questions: start over rather than grow
            self.entries.clear()
            self.size = 0
        self.entries.setdefault(key, {})[qtype] = tail
        self.size += 1


# ---------------------------------------------------------------------------------------------
# Parsing queries


@dataclass(frozen=True)
class Question:
    key: bytes  # lower-case wire name
    name: str  # lower case, no trailing dot
    qtype: int
    question_end: int
    limit: int  # largest reply we may send
    edns: bool


@dataclass(frozen=True)
class Forward:
    """Not our name: resolve (name, qtype) upstream, then reply with the result."""
    question: Question
    tcp: bool


@dataclass(frozen=True)
class Chase:
    """An ExternalName: reply with `answer` (the CNAME) plus the upstream answer for `target`."""
    question: Question
    answer: Answer
    target: str
    tcp: bool


def parse_fast(query: bytes, tcp: bool) -> tuple[bytes, int, int, int, bool] | None:
    """(key, qtype, question_end, limit, edns) of a plain query, or None to take the slow path.

    Plain: QR=0, opcode QUERY, one question of class IN, no answer/authority records, at most an
    EDNS0 version 0 OPT. The question name ends at its first zero byte; if a label held a zero byte
    this key is not a complete name, so it cannot match a table key, and the slow path answers it.
    """
    # startswith(x, offset) and single-byte reads: no slices allocated on the hot path
    if len(query) < 17 or query[2] & 0xF8 or not query.startswith(b"\x00\x01\x00\x00\x00\x00", 4):
        return None
    name_end = query.find(0, 12)
    question_end = name_end + 5
    if name_end < 0 or not query.startswith(b"\x00\x01", name_end + 3):
        return None
    qtype = (query[name_end + 1] << 8) | query[name_end + 2]
    if 128 <= qtype <= 255:
        return None  # meta and question-only types (ANY, AXFR, IXFR, ...) are not in the table
    limit = MAX_TCP_SIZE if tcp else 512
    edns = False
    rest = len(query) - question_end
    if query[10] or query[11] > 1:
        return None
    if query[11]:
        if rest < 11 or not query.startswith(OPT_HEAD, question_end) or query[question_end + 6]:
            return None  # not an OPT, or EDNS version != 0 (BADVERS from the slow path)
        edns = True
        if not tcp:
            limit = min(max(512, (query[question_end + 3] << 8) | query[question_end + 4]), MAX_UDP_SIZE)
    elif rest:
        return None
    return query[12:name_end + 1].lower(), qtype, question_end, limit, edns


def respond(table: Table, query: bytes, tcp: bool = False, forwarding: bool = False):
    """Reply bytes for `query`, None to drop it, or a Forward/Chase for the server to finish."""
    fast = parse_fast(query, tcp)
    if fast is not None:
        key, qtype, question_end, limit, edns = fast
        tail = table.find(key, qtype)
        if tail is not None:
            return tail.reply(query, question_end, limit, edns)
    return _respond_slow(table, query, tcp, forwarding)


def error_reply(query: bytes, rcode: int, question: DNSQuestion | None = None,
                edns: bool = False) -> bytes | None:
    """A reply carrying only `rcode` (and the question when we could parse it). None for a message
    too short to have a header, or one that is itself a response (never answer those: loops)."""
    if len(query) < 12 or query[2] & 0x80:
        return None
    header = DNSHeader(id=(query[0] << 8) | query[1], qr=1, opcode=(query[2] >> 3) & 0xF,
                       rd=query[2] & 1, ra=1, rcode=rcode & 0xF)
    message = DNSRecord(header, q=question)
    if edns or rcode > 15:
        message.add_ar(RR("", QTYPE.OPT, rclass=MAX_UDP_SIZE, ttl=(rcode >> 4) << 24, rdata=[]))
    return bytes(message.pack())


def _respond_slow(table: Table, query: bytes, tcp: bool, forwarding: bool):
    try:
        message = DNSRecord.parse(query)
    except (DNSError, ValueError, IndexError, UnicodeError, struct.error):
        return error_reply(query, FORMERR)
    except Exception:  # dnslib raises assorted types on hostile input; a query must never kill us
        return error_reply(query, FORMERR)
    if message.header.qr:
        return None
    if message.header.opcode != 0:
        return error_reply(query, NOTIMP)
    opts = [rr for rr in message.ar if rr.rtype == QTYPE_OPT]
    if len(message.questions) != 1 or len(opts) > 1:
        return error_reply(query, FORMERR, edns=bool(opts))
    q = message.questions[0]
    edns = bool(opts)
    if edns and (opts[0].ttl >> 16) & 0xFF:  # EDNS version other than 0
        return error_reply(query, BADVERS, q)
    if q.qclass != 1 or q.qtype in (QTYPE_AXFR, QTYPE_IXFR):
        return error_reply(query, REFUSED, q, edns)
    try:
        name = str(q.qname).rstrip(".").lower()
        key = encode_name(name)
    except (UnicodeError, ValueError):
        return error_reply(query, REFUSED, q, edns)
    question_end = 12 + len(key) + 4
    if query[12:question_end - 4].lower() != key:
        return error_reply(query, FORMERR, edns=edns)  # a compressed or odd question: no splicing
    limit = MAX_TCP_SIZE if tcp else 512
    if edns and not tcp:
        limit = min(max(512, opts[0].rclass), MAX_UDP_SIZE)
    question = Question(key, name, q.qtype, question_end, limit, edns)
    answer = lookup(table.zone, name, type_name(q.qtype))
    if answer is None:
        if forwarding:
            return Forward(question, tcp)
        return error_reply(query, REFUSED, q, edns)  # CoreDNS for a zone no server block serves
    if answer.chase and answer.rcode == NOERROR:
        if forwarding:
            return Chase(question, answer, answer.chase, tcp)
        return Tail.from_answer(name, q.qtype, Answer(NOERROR, answer.answer)).reply(  # the CNAME alone
            query, question_end, limit, edns)
    tail = Tail.from_answer(name, q.qtype, answer)
    table.remember(key, q.qtype, tail)
    return tail.reply(query, question_end, limit, edns)


def servfail_tail(question: Question) -> Tail:
    return Tail.from_rrs(question.name, question.qtype, SERVFAIL, [], [], [], authoritative=False)

