"""A pod's network sandbox: its namespace, its /etc files, and the CNI calls that wire it.

Pure part: names, file texts, the network config, the CNI environment, reading the CNI result.
Shell part: small blocking functions (the agent runs them in executor threads) that create and
remove namespaces, write the files, and exec the plugin exactly as a CNI runtime does (env +
config on stdin, result or error JSON on stdout).
"""
from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from netplane import netns

POD_NETNS_PREFIX = "np-pod-"
NETWORK_NAME = "netplane"
PLUGIN_TYPE = "netplane-cni"
CNI_VERSION = "1.0.0"
IFNAME = "eth0"
ETC_NETNS = "/etc/netns"


class CNIError(RuntimeError):
    """The plugin failed; the message is the plugin's own (code and msg from its error JSON)."""


# ---------------------------------------------------------------- pure: names and texts

def netns_name(uid: str) -> str:
    """The pod's namespace name: marker prefix + a short stable hash of the pod's uid.

    Anyone with the Pod object (e.g. `netplane lab exec POD`) can compute it.
    """
    return POD_NETNS_PREFIX + hashlib.sha256(uid.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class DnsSettings:
    """A pod's spec.dnsPolicy and spec.dnsConfig (already validated by the API server)."""
    policy: str = "ClusterFirst"
    nameservers: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    options: tuple[tuple[str, str | None], ...] = ()  # (name, value or None)

    @classmethod
    def from_spec(cls, spec: dict) -> "DnsSettings":
        config = spec.get("dnsConfig") or {}
        options = tuple((o["name"], None if o.get("value") is None else str(o["value"]))
                        for o in config.get("options") or [] if isinstance(o, dict) and o.get("name"))
        return cls(spec.get("dnsPolicy") or "ClusterFirst", tuple(config.get("nameservers") or ()),
                   tuple(config.get("searches") or ()), options)


@dataclass(frozen=True)
class PodRef:
    """The few facts about a pod that its sandbox needs."""
    namespace: str
    name: str
    uid: str
    hostname: str
    subdomain: str = ""
    dns: DnsSettings = DnsSettings()

    @classmethod
    def from_pod(cls, pod: dict) -> "PodRef":
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        name = meta.get("name", "")
        namespace = meta.get("namespace") or "default"
        uid = meta.get("uid") or hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:32]
        # k8s: spec.hostname, else the pod name, cut to a DNS label (63).
        hostname = (spec.get("hostname") or name)[:63].rstrip("-.") or "pod"
        return cls(namespace, name, uid, hostname, spec.get("subdomain") or "", DnsSettings.from_spec(spec))

    @property
    def netns(self) -> str:
        return netns_name(self.uid)

    @property
    def dir_name(self) -> str:
        return f"{self.namespace}_{self.name}_{self.uid}"


MAX_NAMESERVERS = 3  # what the resolver reads (resolv.conf(5)); the kubelet keeps the first 3 too
MAX_SEARCHES = 32


def resolv_conf(pod_namespace: str, cluster_dns: str, cluster_domain: str,
                dns: DnsSettings = DnsSettings(), node_resolv_conf: str = "") -> str:
    """The pod's /etc/resolv.conf, as the kubelet writes it (pkg/kubelet/network/dns):
    ClusterFirst (and ClusterFirstWithHostNet: no host network here): the cluster DNS and search
    path, ndots:5; Default: the node's own resolv.conf; None: dnsConfig alone. dnsConfig is then
    merged in: its nameservers and searches appended (duplicates dropped), its options replacing
    options of the same name."""
    if dns.policy == "Default":
        nameservers, searches, options = parse_resolv_conf(node_resolv_conf)
    elif dns.policy == "None":
        nameservers, searches, options = [], [], []
    else:
        nameservers = [cluster_dns]
        searches = [f"{pod_namespace}.svc.{cluster_domain}", f"svc.{cluster_domain}", cluster_domain]
        options = [("ndots", "5")]
    nameservers = _unique([*nameservers, *dns.nameservers])[:MAX_NAMESERVERS]
    searches = _unique([*searches, *dns.searches])[:MAX_SEARCHES]
    merged = dict(options)
    merged.update(dns.options)
    lines = []
    if searches:
        lines.append("search " + " ".join(searches))
    lines += [f"nameserver {ip}" for ip in nameservers]
    if merged:
        lines.append("options " + " ".join(n if v is None else f"{n}:{v}" for n, v in merged.items()))
    return "\n".join(lines) + "\n"


def parse_resolv_conf(text: str) -> tuple[list[str], list[str], list[tuple[str, str | None]]]:
    """(nameservers, search domains, options) of a resolv.conf; the last search/domain line wins."""
    nameservers, searches, options = [], [], []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) < 2:
            continue
        if fields[0] == "nameserver":
            nameservers.append(fields[1])
        elif fields[0] in ("search", "domain"):
            searches = fields[1:]
        elif fields[0] == "options":
            options += [(o.split(":", 1)[0], o.split(":", 1)[1] if ":" in o else None) for o in fields[1:]]
    return nameservers, searches, options


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def hosts_file(pod: PodRef, pod_ip: str, cluster_domain: str) -> str:
    """The kubelet's managed hosts file: loopback names, then the pod's own name(s) on its IP."""
    names = pod.hostname
    if pod.subdomain:
        names = f"{pod.hostname}.{pod.subdomain}.{pod.namespace}.svc.{cluster_domain}\t{pod.hostname}"
    return ("# Kubernetes-managed hosts file (netplane agent).\n"
            "127.0.0.1\tlocalhost\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
            "fe00::0\tip6-localnet\n"
            "fe00::0\tip6-mcastprefix\n"
            "fe00::1\tip6-allnodes\n"
            "fe00::2\tip6-allrouters\n"
            f"{pod_ip}\t{names}\n")


def network_config(pod_cidr: str, state_dir: str) -> dict:
    """The node's CNI network config for its pod CIDR; the gateway (cni0) is the CIDR's first IP."""
    try:
        network = ipaddress.ip_network(pod_cidr, strict=True)
    except ValueError as err:
        raise ValueError(f"spec.podCIDR {pod_cidr!r} is not a network: {err}") from None
    if network.num_addresses < 4:
        raise ValueError(f"spec.podCIDR {pod_cidr!r} is too small for a gateway and pods")
    gateway = str(next(network.hosts()))
    return {
        "cniVersion": CNI_VERSION, "name": NETWORK_NAME, "type": PLUGIN_TYPE, "bridge": "cni0",
        "isGateway": True, "isDefaultGateway": True, "ipMasq": False, "hairpinMode": True, "mtu": 1500,
        "ipam": {"type": "netplane", "ranges": [[{"subnet": str(network), "gateway": gateway}]],
                 "dataDir": os.path.join(state_dir, "ipam")},
    }


def cni_env(command: str, pod: PodRef, cni_bin_dir: str, netns_path: str | None,
            base_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one plugin call, per the CNI spec (ARGS as CRI runtimes send them)."""
    env = dict(base_env or {})
    env.update({
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": pod.uid,
        "CNI_IFNAME": IFNAME,
        "CNI_PATH": cni_bin_dir,
        "CNI_ARGS": (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name};"
                     f"K8S_POD_INFRA_CONTAINER_ID={pod.uid};K8S_POD_UID={pod.uid}"),
    })
    if netns_path:
        env["CNI_NETNS"] = netns_path
    return env


def pod_ip_from_result(result: dict) -> str:
    """The pod's IPv4 address from an ADD result: the first ips[] entry on the sandbox interface."""
    sandbox_ifaces = {i for i, iface in enumerate(result.get("interfaces") or []) if iface.get("sandbox")}
    candidates = []
    for entry in result.get("ips") or []:
        address = str(entry.get("address", "")).split("/")[0]
        if not address:
            continue
        on_sandbox = entry.get("interface") in sandbox_ifaces or not sandbox_ifaces
        candidates.append((not on_sandbox, ":" in address, address))
    if not candidates:
        raise CNIError(f"CNI ADD result has no IP address: {json.dumps(result)[:300]}")
    return sorted(candidates)[0][2]


def error_from_output(returncode: int, stdout: str, stderr: str) -> str:
    """The CNI error JSON's code and msg (and details), else the raw output."""
    try:
        error = json.loads(stdout)
        message = f"code {error.get('code')}: {error.get('msg')}"
        if error.get("details"):
            message += f" ({error['details']})"
        return message
    except (ValueError, AttributeError):
        return f"exit code {returncode}: {(stderr or stdout).strip()[:500]}"


# ---------------------------------------------------------------- shell (blocking; run in threads)

def netns_mounts_propagate(mountinfo: str) -> bool:
    """Whether a namespace we bind-mount under /run/netns shows up for everyone, from the text of
    /proc/self/mountinfo: not when our /run/netns is a slave copy ("master:N", as under
    `ip netns exec`, which gives its command a private mount namespace)."""
    for line in reversed(mountinfo.splitlines()):
        fields = line.split()
        if len(fields) > 5 and fields[4] == netns.NETNS_DIR:
            optional = fields[6:fields.index("-")] if "-" in fields else []
            return not any(tag.startswith("master:") for tag in optional)
    return True  # no /run/netns mount yet: `ip netns add` will make one in our namespace


class MountNamespaceError(RuntimeError):
    pass


@functools.cache
def host_mount_prefix() -> tuple[str, ...]:
    """() when our /run/netns mounts are visible to all; else an nsenter prefix into a mount
    namespace where they are (PID 1's or our parent's). MountNamespaceError when there is none."""
    try:
        if netns_mounts_propagate(Path("/proc/self/mountinfo").read_text()):
            return ()
        ours = os.readlink("/proc/self/ns/mnt")
    except OSError:
        return ()
    for pid in (1, os.getppid()):
        try:
            if os.readlink(f"/proc/{pid}/ns/mnt") != ours:
                # Hold the namespace open: our parent (e.g. `netplane lab up`) may exit later.
                fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
                return ("nsenter", f"--mount=/proc/{os.getpid()}/fd/{fd}", "--")
        except OSError:
            continue
    raise MountNamespaceError(
        "this process runs in a private mount namespace (started with `ip netns exec`?), so pod "
        "namespaces it mounts on /run/netns would be invisible outside it; start the agent with "
        "`nsenter --net=/run/netns/NODE -- netplane agent ...` instead")


def _host_mount_ns(argv: list[str]) -> list[str]:
    return [*host_mount_prefix(), *argv]


def create_netns(name: str) -> None:
    if not netns.exists(name):
        netns.run(_host_mount_ns(["ip", "netns", "add", name]))
    netns.run(["ip", "link", "set", "lo", "up"], netns=name)


def delete_netns(name: str) -> None:
    """Kill what still runs inside, then remove the namespace; missing is fine."""
    if not netns.exists(name):
        return
    netns.kill_processes(name)
    netns.run(_host_mount_ns(["ip", "netns", "delete", name]), check=False)


def write_etc_files(netns_name_: str, files: dict[str, str]) -> None:
    """/etc/netns/<ns>/<file>: `ip netns exec` bind-mounts these over /etc/<file>."""
    directory = Path(ETC_NETNS) / netns_name_
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(directory / name)


def remove_etc_files(netns_name_: str) -> None:
    shutil.rmtree(Path(ETC_NETNS) / netns_name_, ignore_errors=True)


def write_network_config(path: str, config: dict) -> bool:
    """Write the CNI config file atomically; False when it already holds exactly this config."""
    text = json.dumps(config, indent=2) + "\n"
    target = Path(path)
    if target.exists() and target.read_text() == text:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(target)
    return True


def call_plugin(command: str, config: dict, pod: PodRef, cni_bin_dir: str,
                netns_path: str | None, timeout: float = 60) -> dict:
    """Exec `<cni_bin_dir>/<type>` as a CNI runtime does; the parsed result (ADD) or {}.

    The config on stdin is the network config with `name` and `cniVersion` (a single-plugin
    network, so the plugin object is the config itself). Raises CNIError with the plugin's message.
    """
    plugin = os.path.join(cni_bin_dir, config["type"])
    if not os.access(plugin, os.X_OK):
        raise CNIError(f"CNI plugin {plugin} not found or not executable (--cni-bin-dir)")
    env = cni_env(command, pod, cni_bin_dir, netns_path, base_env={"PATH": os.environ.get("PATH", "")})
    argv = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), plugin]
    try:
        proc = netns.run(argv, input=json.dumps(config), check=False, timeout=timeout)
    except Exception as err:  # timeout, exec failure
        raise CNIError(f"CNI {command} failed to run: {err}") from None
    if proc.returncode != 0:
        raise CNIError(f"CNI {command} failed: {error_from_output(proc.returncode, proc.stdout, proc.stderr)}")
    if command != "ADD":
        return {}
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise CNIError(f"CNI ADD printed no JSON result: {proc.stdout.strip()[:300]!r}") from None
