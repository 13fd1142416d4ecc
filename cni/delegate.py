"""Delegated IPAM: when ipam.type names another plugin, exec <CNI_PATH>/<type> as the spec says
(same environment but CNI_COMMAND, the whole request on stdin) and pass its errors through."""
from __future__ import annotations

import os

from . import ipnet
from . import jsonlite as json
from .config import RouteConf
from .proc import run
from .spec import INTERNAL, INVALID_NETWORK_CONFIG, CniError


def find(plugin_type: str, cni_path) -> str:
    for directory in cni_path:
        path = os.path.join(directory, plugin_type)
        if os.access(path, os.X_OK):
            return path
    raise CniError(INVALID_NETWORK_CONFIG,
                   f"invalid network config: ipam.type: no plugin {plugin_type!r} in CNI_PATH {list(cni_path)}")


def call(command: str, plugin_type: str, env, request: dict) -> dict | None:
    """Run the IPAM plugin with our environment (env: a spec.Env) but CNI_COMMAND; its result (ADD) or
    None; its error JSON becomes our CniError."""
    environ = dict(env.environ, CNI_COMMAND=command)
    code, out, err = run([find(plugin_type, env.path)], json.dumps(request), check=False, env=environ)
    if code != 0:
        try:
            reply = json.loads(out)
            raise CniError(int(reply.get("code", INTERNAL)), f"ipam {plugin_type}: {reply.get('msg', '')}",
                           reply.get("details", ""))
        except (ValueError, AttributeError):
            raise CniError(INTERNAL, f"ipam {plugin_type} {command} failed with exit code {code}: "
                                     f"{(err or out).strip()}")
    if not out.strip():
        return None
    try:
        return json.loads(out)
    except ValueError:
        raise CniError(INTERNAL, f"ipam {plugin_type} {command} printed a result that is not JSON: {out[:200]!r}")


def routes(result: dict) -> list:
    """The result's routes as RouteConf values."""
    out = []
    for i, entry in enumerate(result.get("routes") or []):
        try:
            gw = ipnet.ip_address(entry["gw"]) if entry.get("gw") else None
            out.append(RouteConf(ipnet.ip_network(entry["dst"], strict=False), gw))
        except (KeyError, TypeError, ValueError):
            raise CniError(INTERNAL, f"ipam result routes[{i}] is not a dst/gw pair: {entry!r}")
    return out


def addresses(result: dict) -> list:
    """[(ip_interface, gateway or None)] from an IPAM result."""
    out = []
    for i, entry in enumerate(result.get("ips") or []):
        try:
            address = ipnet.ip_interface(entry["address"])
            gateway = ipnet.ip_address(entry["gateway"]) if entry.get("gateway") else None
        except (KeyError, TypeError, ValueError):
            raise CniError(INTERNAL, f"ipam result ips[{i}] is not an address/gateway pair: {entry!r}")
        out.append((address, gateway))
    if not out:
        raise CniError(INTERNAL, "ipam result has no ips")
    return out
