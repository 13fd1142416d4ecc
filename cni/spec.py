"""The CNI protocol itself: versions, error codes, the environment, and the result's JSON shape.

Pure: no I/O here. The plugin shell (plugin.py) reads the environment and stdin, calls into this
module, and prints what it returns. The facts come from the CNI spec 1.0.0/1.1.0 (SPEC.md) and what
libcni's skel checks before a plugin runs.
"""
from .record import record  # collections costs ~3 ms and dataclasses ~20 ms per exec

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = "1.1.0"

# Error codes: 1-99 are the spec's; 100+ are ours; 999 is libcni's "internal" (the reference plugins'
# code for most runtime failures).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_NETWORK_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
NO_FREE_ADDRESS = 100
INTERNAL = 999

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
# Which environment variables each command needs (CNI_COMMAND itself is always needed).
_NEEDS_ATTACHMENT = ("ADD", "DEL", "CHECK")
_NEEDS_NETNS = ("ADD", "CHECK")

ID_PATTERN = "^[a-zA-Z0-9][a-zA-Z0-9_.-]*$"   # container ids and network names
_ID_FIRST = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_ID_REST = _ID_FIRST | frozenset("_.-")


def valid_id(text) -> bool:
    """Does `text` match ID_PATTERN? (Checked by hand: `re` costs ~5 ms of imports per exec.)"""
    return (isinstance(text, str) and text != "" and text[0] in _ID_FIRST
            and all(c in _ID_REST for c in text))


class CniError(Exception):
    """A failure the plugin reports as the spec's error JSON on stdout, with a non-zero exit."""

    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict:
        out = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


# environ: the whole environment the command runs with (a delegated plugin gets it too)
Env = record("Env", "command container_id netns ifname args path environ", defaults=({},))


def version_tuple(version: str) -> tuple:
    try:
        return tuple(int(part) for part in version.split("."))
    except (AttributeError, ValueError):
        return (0,)


def check_version(version) -> str:
    """The config's cniVersion if we speak it; error 1 otherwise (a missing one means 0.1.0)."""
    if version is None:
        version = "0.1.0"
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f"config is {version!r}, plugin supports {list(SUPPORTED_VERSIONS)}")
    return version


def validate_ifname(name: str) -> str | None:
    """Why `name` cannot be a Linux interface name, or None when it can."""
    if not name:
        return "is empty"
    if len(name) > 15:
        return f"{name!r} is longer than 15 characters"
    if name in (".", ".."):
        return f"{name!r} is not allowed"
    if any(c in name for c in "/:") or any(c.isspace() for c in name):
        return f"{name!r} contains '/', ':' or whitespace"
    return None


def parse_cni_args(text: str) -> dict:
    """CNI_ARGS `K=V;K2=V2` -> dict."""
    out = {}
    for pair in filter(None, text.split(";")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS: {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def parse_env(environ) -> Env:
    """The CNI_* variables, checked for what the command needs (error 4 naming the variable)."""
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        what = "is not set" if not command else f"{command!r} is not one of {', '.join(COMMANDS)}"
        raise CniError(INVALID_ENVIRONMENT, f"CNI_COMMAND {what}")
    container_id = environ.get("CNI_CONTAINERID", "")
    netns = environ.get("CNI_NETNS", "")
    ifname = environ.get("CNI_IFNAME", "")
    if command in _NEEDS_ATTACHMENT:
        if not container_id:
            raise CniError(INVALID_ENVIRONMENT, "CNI_CONTAINERID is not set")
        if not valid_id(container_id):
            raise CniError(INVALID_ENVIRONMENT, f"CNI_CONTAINERID {container_id!r} must match {ID_PATTERN}")
        why = validate_ifname(ifname)
        if why:
            raise CniError(INVALID_ENVIRONMENT,
                           "CNI_IFNAME is not set" if not ifname else f"CNI_IFNAME {why}")
    if command in _NEEDS_NETNS and not netns:
        raise CniError(INVALID_ENVIRONMENT, "CNI_NETNS is not set")
    args = parse_cni_args(environ.get("CNI_ARGS", ""))
    path = tuple(p for p in environ.get("CNI_PATH", "").split(":") if p)
    return Env(command, container_id, netns, ifname, args, path, environ)


# ---- results -------------------------------------------------------------------------------------

Interface = record("Interface", "name mac sandbox mtu", defaults=("", None))
# address: CIDR (10.244.1.5/24); gateway: str or None; interface: index into the result's interfaces
IPConfig = record("IPConfig", "address gateway interface")
Route = record("Route", "dst gw", defaults=(None,))


def result_json(version: str, interfaces, ips, routes, dns: dict | None) -> dict:
    """The ADD result in the shape of the requested version (0.3.x/0.4.0 carry ips[].version)."""
    with_ip_version = version_tuple(version) < (1, 0, 0)
    with_mtu = version_tuple(version) >= (1, 1, 0)
    out = {"cniVersion": version}
    if interfaces:
        out["interfaces"] = [_interface_json(i, with_mtu) for i in interfaces]
    out["ips"] = [_ip_json(ip, with_ip_version) for ip in ips]
    if routes:
        out["routes"] = [{"dst": r.dst, **({"gw": r.gw} if r.gw else {})} for r in routes]
    out["dns"] = dict(dns or {})
    return out


def _interface_json(iface: Interface, with_mtu: bool) -> dict:
    out = {"name": iface.name, "mac": iface.mac}
    if with_mtu and iface.mtu:
        out["mtu"] = iface.mtu
    if iface.sandbox:
        out["sandbox"] = iface.sandbox
    return out


def _ip_json(ip: IPConfig, with_ip_version: bool) -> dict:
    out = {}
    if with_ip_version:
        out["version"] = "6" if ":" in ip.address else "4"
    out["address"] = ip.address
    if ip.gateway:
        out["gateway"] = ip.gateway
    if ip.interface is not None:
        out["interface"] = ip.interface
    return out


def version_json(requested: str) -> dict:
    return {"cniVersion": requested, "supportedVersions": list(SUPPORTED_VERSIONS)}
