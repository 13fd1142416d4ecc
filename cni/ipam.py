"""Built-in IPAM: which address a pod gets (pure) and where allocations live (a directory on disk).

The on-disk layout is host-local's, so an operator who knows one knows the other:
<dataDir>/<network>/<ip> holds "<containerID>\\r\\n<ifname>", last_reserved_ip.<range set index>
remembers where round-robin continues, and every change happens under flock(<dir>/lock).
"""
import errno
import fcntl
import posix

from . import ipnet, paths
from .config import IpamConf, Range, RangeSet
from .record import record
from .spec import IO_FAILURE, NO_FREE_ADDRESS, CniError

LOCK_FILE = "lock"
LAST_RESERVED_PREFIX = "last_reserved_ip."
_ADDRESS_FIRST = frozenset("0123456789abcdefABCDEF:")   # how the name of an allocation file can start


Owner = record("Owner", "container_id ifname")


class Pick(record("Pick", "ip range index new")):
    """The address (ip) chosen from range set number `index` and the Range it is in; new: whether
    this ADD reserved it (else the owner already had it)."""
    __slots__ = ()

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{self.range.subnet.prefixlen}"


# ---- pure -----------------------------------------------------------------------------------------

def candidates(range_set: RangeSet, last_reserved=None):
    """Every allocatable address of the set once, starting right after `last_reserved` (round-robin)
    and wrapping around; gateways are never handed out."""
    ranges = range_set.ranges
    first = 0
    resume_at = None
    if last_reserved is not None:
        for i, r in enumerate(ranges):
            if r.contains(last_reserved):
                first, resume_at = i, int(last_reserved) + 1
                break
    version = range_set.version
    order = list(range(first, len(ranges))) + list(range(0, first + 1))
    for step, i in enumerate(order):
        r = ranges[i]
        lo, hi = r.start, r.end
        if step == 0 and resume_at is not None:
            lo = resume_at
        elif step == len(order) - 1:
            # Back at the range we started in: only the part before the resume point is left.
            if resume_at is None:
                return
            hi = resume_at - 1
        gateway = int(r.gateway)
        for value in range(lo, hi + 1):
            if value != gateway:
                yield ipnet.Address(version, value)


def choose(range_set: RangeSet, taken, last_reserved=None):
    """The next free address of the set after `last_reserved`; error 100 when there is none."""
    for ip in candidates(range_set, last_reserved):
        if ip not in taken:
            return ip
    raise CniError(NO_FREE_ADDRESS, f"no free address in {range_set.describe()}")


def plan(ipam: IpamConf, allocations: dict, last_reserved: dict, owner: Owner) -> list:
    """One Pick per range set: the owner's existing address in that set if it has one (asking again
    gets the same address), else the next free one round-robin."""
    picks = []
    taken = set(allocations)
    for index, range_set in enumerate(ipam.range_sets):
        mine = sorted(ip for ip, who in allocations.items()
                      if who == owner and range_set.range_of(ip) is not None)
        if mine:
            picks.append(Pick(mine[0], range_set.range_of(mine[0]), index, new=False))
            continue
        ip = choose(range_set, taken, last_reserved.get(index))
        taken.add(ip)
        picks.append(Pick(ip, range_set.range_of(ip), index, new=True))
    return picks


def parse_owner(text: str) -> Owner:
    lines = [line.strip() for line in text.splitlines()]
    return Owner(lines[0] if lines else "", lines[1] if len(lines) > 1 else "")


def owned_by(who: Owner, container_id: str, ifname: str) -> bool:
    # Files written with only the container id (old host-local) belong to every ifname of it.
    return who.container_id == container_id and who.ifname in (ifname, "")


# ---- the directory --------------------------------------------------------------------------------

class Store:
    def __init__(self, data_dir: str, network: str, lock_file: str = LOCK_FILE):
        self.dir = paths.join(data_dir, network)
        self.lock_file = lock_file

    def locked(self) -> "_Lock":
        """`with store.locked():` holds flock(<dir>/lock) for the whole of one command, so parallel
        ADDs of many pods are serialised per network."""
        return _Lock(self)

    def allocations(self) -> dict:
        """{ip: Owner} for every allocation file in the directory."""
        out = {}
        try:
            names = posix.listdir(self.dir)
        except FileNotFoundError:
            return out
        prefix = self.dir + "/"
        for name in names:
            if name[0] not in _ADDRESS_FIRST:
                continue   # lock, last_reserved_ip.N: skipped without the cost of a parse error
            try:
                ip = ipnet.ip_address(name)
            except ValueError:
                continue
            text = _read(prefix + name)
            if text is not None:
                out[ip] = parse_owner(text)
        return out

    def last_reserved(self, count: int) -> dict:
        out = {}
        for index in range(count):
            try:
                out[index] = ipnet.ip_address((_read(paths.join(self.dir, f"{LAST_RESERVED_PREFIX}{index}")) or "").strip())
            except ValueError:
                pass
        return out

    def reserve(self, pick: Pick, owner: Owner) -> None:
        path = paths.join(self.dir, str(pick.ip))
        try:
            fd = posix.open(path, posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.EEXIST:
                raise CniError(IO_FAILURE, f"{pick.ip} is already allocated ({path} exists)")
            raise CniError(IO_FAILURE, f"cannot write {path}: {e}")
        try:
            posix.write(fd, f"{owner.container_id}\r\n{owner.ifname}".encode())
        finally:
            posix.close(fd)
        self._write(f"{LAST_RESERVED_PREFIX}{pick.index}", str(pick.ip))

    def release(self, ip) -> None:
        try:
            posix.unlink(paths.join(self.dir, str(ip)))
        except FileNotFoundError:
            pass

    def release_owner(self, container_id: str, ifname: str) -> list:
        """Release every address of (container, ifname); unknown is fine (DEL is idempotent)."""
        released = [ip for ip, who in self.allocations().items() if owned_by(who, container_id, ifname)]
        for ip in released:
            self.release(ip)
        return released

    def _write(self, name: str, text: str) -> None:
        # In place (a rename costs more than the rest of the IPAM step), and without O_TRUNC: ext4
        # flushes a file truncated to zero and rewritten when it is closed (auto_da_alloc), ~0.4 ms
        # here; overwriting, then cutting to length, is not flushed. A crash mid-write leaves a wrong
        # or unparsable hint, and round-robin starts from elsewhere. No harm.
        data = text.encode()
        fd = posix.open(paths.join(self.dir, name), posix.O_WRONLY | posix.O_CREAT | posix.O_CLOEXEC, 0o644)
        try:
            posix.pwrite(fd, data, 0)
            posix.ftruncate(fd, len(data))
        finally:
            posix.close(fd)


def _read(path: str) -> str | None:
    """A small file's text, or None when it is gone (posix.read: open() would build a text stream per
    allocation file, and ADD reads every one)."""
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return posix.read(fd, 4096).decode(errors="replace")
    finally:
        posix.close(fd)


class _Lock:
    """flock as a context manager (contextlib costs ~4 ms of imports per exec)."""

    def __init__(self, store: Store):
        self.store = store
        self.fd = -1

    def __enter__(self) -> Store:
        try:
            paths.makedirs(self.store.dir, 0o755)
            self.fd = posix.open(paths.join(self.store.dir, self.store.lock_file), posix.O_RDWR | posix.O_CREAT | posix.O_CLOEXEC, 0o644)
        except OSError as e:
            raise CniError(IO_FAILURE, f"cannot open the IPAM lock in {self.store.dir}: {e}")
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self.store

    def __exit__(self, *exc) -> None:
        posix.close(self.fd)   # closing the only descriptor releases the flock
