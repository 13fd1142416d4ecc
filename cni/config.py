"""The network configuration (the JSON on stdin) parsed once into small frozen values.

Pure. Every bad field raises CniError naming the field: code 7 for an invalid config, code 2 for a
field we know but do not support with that value. Unknown keys are ignored, as the spec asks
(runtimes pass fields of other plugins through).
"""
from . import ipnet
from .record import record
from .spec import (ID_PATTERN, INVALID_NETWORK_CONFIG, UNSUPPORTED_FIELD, CniError, check_version,
                   valid_id, validate_ifname)

BUILTIN_IPAM = ("", "netplane")
DEFAULT_DATA_DIR = "/var/lib/cni/networks"

# Options of the reference bridge plugin we do not implement: using them with a non-default value is
# error 2 (unsupported field) rather than a silent difference.
_UNSUPPORTED_BRIDGE_OPTIONS = {
    "vlan": (None, 0), "vlanTrunk": (None, []), "preserveDefaultVlan": (None, True, False),
    "macspoofchk": (None, False), "disableContainerInterface": (None, False),
    "portIsolation": (None, False), "enabledad": (None, False),
    "ipMasqBackend": (None, "", "nftables"),
}


def bad(field: str, why: str) -> CniError:
    return CniError(INVALID_NETWORK_CONFIG, f"invalid network config: {field}: {why}")


class Range(record("Range", "subnet start end gateway")):
    """subnet: an ipnet.Network; start, end: the first and last allocatable address as ints;
    gateway: an ipnet.Address (never handed out)."""
    __slots__ = ()

    @property
    def version(self) -> int:
        return self.subnet.version

    def contains(self, ip) -> bool:
        return ip.version == self.version and self.start <= int(ip) <= self.end


class RangeSet(record("RangeSet", "ranges")):
    """Ranges of one family; a pod gets one address from each range set."""
    __slots__ = ()

    @property
    def version(self) -> int:
        return self.ranges[0].version

    def range_of(self, ip) -> Range | None:
        return next((r for r in self.ranges if r.contains(ip)), None)

    def describe(self) -> str:
        return ", ".join(str(r.subnet) for r in self.ranges)


# dst: an ipnet.Network; gw: an ipnet.Address or None (then: the gateway of dst's family)
RouteConf = record("RouteConf", "dst gw")


class IpamConf(record("IpamConf", "type range_sets routes data_dir")):
    """range_sets: RangeSets and routes: RouteConfs (built-in IPAM only; another type is delegated)."""
    __slots__ = ()

    @property
    def builtin(self) -> bool:
        return self.type in BUILTIN_IPAM


# raw is the whole request, passed as is to a delegated IPAM plugin.
NetConf = record("NetConf", "cni_version name bridge is_gateway is_default_gateway force_address "
                                "ip_masq hairpin promisc mtu ipam dns prev_result raw")


def parse_netconf(data) -> NetConf:
    if not isinstance(data, dict):
        raise bad("config", "must be a JSON object")
    version = check_version(data.get("cniVersion"))
    name = data.get("name")
    if not valid_id(name):
        raise bad("name", f"{name!r} must be a string matching {ID_PATTERN}")
    _reject_unsupported(data)
    bridge = data.get("bridge", "cni0")
    why = validate_ifname(bridge) if isinstance(bridge, str) else "must be a string"
    if why:
        raise bad("bridge", why)
    flags = {key: _bool(data, key) for key in
             ("isGateway", "isDefaultGateway", "forceAddress", "ipMasq", "hairpinMode", "promiscMode")}
    if flags["hairpinMode"] and flags["promiscMode"]:
        raise bad("hairpinMode", "cannot be true together with promiscMode")
    dns = data.get("dns") or {}
    if not isinstance(dns, dict):
        raise bad("dns", "must be an object")
    prev = data.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise bad("prevResult", "must be an object")
    return NetConf(
        cni_version=version, name=name, bridge=bridge,
        is_gateway=flags["isGateway"] or flags["isDefaultGateway"],
        is_default_gateway=flags["isDefaultGateway"], force_address=flags["forceAddress"],
        ip_masq=flags["ipMasq"], hairpin=flags["hairpinMode"], promisc=flags["promiscMode"],
        mtu=_mtu(data.get("mtu")), ipam=parse_ipam(data.get("ipam")), dns=dns,
        prev_result=prev, raw=data)


def _reject_unsupported(data: dict) -> None:
    for key, allowed in _UNSUPPORTED_BRIDGE_OPTIONS.items():
        if key in data and data[key] not in allowed:
            raise CniError(UNSUPPORTED_FIELD, f"unsupported field {key}={data[key]!r}",
                           "netplane-cni does not implement this option of the bridge plugin")


def _bool(data: dict, key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise bad(key, f"{value!r} must be true or false")
    return value


def _mtu(value) -> int | None:
    if value is None or value == 0:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 68 <= value <= 65535:
        raise bad("mtu", f"{value!r} must be an integer between 68 and 65535")
    return value


def parse_ipam(ipam) -> IpamConf:
    if not isinstance(ipam, dict):
        raise bad("ipam", "is required (an object)")
    ipam_type = ipam.get("type", "")
    if not isinstance(ipam_type, str):
        raise bad("ipam.type", "must be a string")
    data_dir = ipam.get("dataDir") or DEFAULT_DATA_DIR
    if not isinstance(data_dir, str) or not data_dir.startswith("/"):
        raise bad("ipam.dataDir", f"{data_dir!r} must be an absolute path")
    if ipam_type not in BUILTIN_IPAM:
        # Delegated to CNI_PATH/<type>: that plugin validates its own config.
        return IpamConf(ipam_type, (), (), data_dir)
    routes = tuple(_route(r, f"ipam.routes[{i}]") for i, r in enumerate(_list(ipam, "routes")))
    return IpamConf(ipam_type, _range_sets(ipam), routes, data_dir)


def _list(obj: dict, key: str, where: str = "ipam.") -> list:
    value = obj.get(key) or []
    if not isinstance(value, list):
        raise bad(where + key, "must be a list")
    return value


def _range_sets(ipam: dict) -> tuple:
    raw_sets = _list(ipam, "ranges")
    if not raw_sets and ipam.get("subnet"):
        # The legacy host-local form: subnet/rangeStart/rangeEnd/gateway at the top of ipam.
        raw_sets = [[{k: ipam[k] for k in ("subnet", "rangeStart", "rangeEnd", "gateway") if k in ipam}]]
    if not raw_sets:
        raise bad("ipam.ranges", "is required: a list of range sets, e.g. [[{\"subnet\": \"10.244.1.0/24\"}]]")
    sets = []
    for i, raw_set in enumerate(raw_sets):
        if not isinstance(raw_set, list) or not raw_set:
            raise bad(f"ipam.ranges[{i}]", "must be a non-empty list of ranges")
        ranges = tuple(_range(r, f"ipam.ranges[{i}][{j}]") for j, r in enumerate(raw_set))
        if len({r.version for r in ranges}) > 1:
            raise bad(f"ipam.ranges[{i}]", "mixes IPv4 and IPv6 ranges (use one range set per family)")
        sets.append(RangeSet(ranges))
    _check_no_overlap(sets)
    return tuple(sets)


def _check_no_overlap(sets: list) -> None:
    seen = []
    for i, range_set in enumerate(sets):
        for j, r in enumerate(range_set.ranges):
            for where, other in seen:
                if r.subnet.version == other.subnet.version and r.start <= other.end and other.start <= r.end:
                    raise bad(f"ipam.ranges[{i}][{j}]", f"{r.subnet} overlaps {where} {other.subnet}")
            seen.append((f"ipam.ranges[{i}][{j}]", r))


def _range(raw, where: str) -> Range:
    if not isinstance(raw, dict):
        raise bad(where, "must be an object with a subnet")
    try:
        subnet = ipnet.ip_network(raw.get("subnet", ""), strict=True)
    except (TypeError, ValueError) as e:
        raise bad(f"{where}.subnet", f"{raw.get('subnet')!r} is not a network address in CIDR form ({e})")
    if subnet.num_addresses < 4:
        raise bad(f"{where}.subnet", f"{subnet} is too small to allocate from")
    first = int(subnet.network_address) + 1
    last = int(subnet.broadcast_address) - (1 if subnet.version == 4 else 0)
    start = _address_in(raw, "rangeStart", subnet, where, first)
    end = _address_in(raw, "rangeEnd", subnet, where, last)
    gateway = _address_in(raw, "gateway", subnet, where, first)
    if not first <= start <= end <= last:
        raise bad(where, f"rangeStart..rangeEnd must be usable addresses of {subnet}, start <= end")
    return Range(subnet, start, end, ipnet.Address(subnet.version, gateway))


def _address_in(raw: dict, key: str, subnet, where: str, default: int) -> int:
    value = raw.get(key)
    if value is None or value == "":
        return default
    try:
        ip = ipnet.ip_address(value)
    except (TypeError, ValueError):
        raise bad(f"{where}.{key}", f"{value!r} is not an IP address")
    if ip not in subnet:
        raise bad(f"{where}.{key}", f"{ip} is not in {subnet}")
    return int(ip)


def _route(raw, where: str) -> RouteConf:
    if not isinstance(raw, dict):
        raise bad(where, "must be an object with dst")
    try:
        dst = ipnet.ip_network(raw.get("dst", ""), strict=False)
    except (TypeError, ValueError):
        raise bad(f"{where}.dst", f"{raw.get('dst')!r} is not a network in CIDR form")
    gw = raw.get("gw")
    if gw:
        try:
            gw = ipnet.ip_address(gw)
        except (TypeError, ValueError):
            raise bad(f"{where}.gw", f"{gw!r} is not an IP address")
        if gw.version != dst.version:
            raise bad(f"{where}.gw", f"{gw} is not of the same family as {dst}")
    return RouteConf(dst, gw or None)


def valid_attachments(data: dict) -> set:
    """GC's list of attachments to keep, as (containerID, ifname) pairs. libcni sends both keys."""
    pairs = set()
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
        items = data.get(key) or []
        if not isinstance(items, list):
            raise bad(key, "must be a list")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not item.get("containerID") or not item.get("ifname"):
                raise bad(f"{key}[{i}]", "must be an object with containerID and ifname")
            pairs.add((item["containerID"], item["ifname"]))
    return pairs
