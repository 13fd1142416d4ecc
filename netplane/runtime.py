"""Containers as processes: what to run for a container spec (pure), and running it (shell).

An image names a program. Built-in images map to our own entry points; `command:` replaces the
entry point and `args:` are appended, with Kubernetes semantics (including `$(VAR)` expansion).
A container runs as a process tree inside the pod's network namespace with the pod's hostname:

    ip netns exec NETNS unshare --uts -- sh -c 'hostname "$1" && shift && exec "$@"' - HOST ARGV...

`ip netns exec` also bind-mounts /etc/netns/NETNS/{resolv.conf,hosts} over /etc. The process
leads its own session (process group), so stopping it reaches every child; it is not an asyncio
child, so it keeps running when the agent stops (as containers outlive a kubelet restart).
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field

DEFAULT_ECHO_PORT = 8080

# repository -> the netplane sub-command that is its entry point
BUILTIN_IMAGES: dict[str, tuple[str, ...]] = {
    "netplane/echo": ("echo",),
    "netplane/dns": ("dns", "serve"),
    "netplane/ingress": ("ingress", "serve"),
}

# Placed between the hostname and the argv; a fixed script, never built from input.
_SET_HOSTNAME = 'hostname "$1" && shift && exec "$@"'


class ImageNotRunnable(ValueError):
    """The container names an image we cannot run (reported as ErrImagePull)."""


# ---------------------------------------------------------------- pure: image -> argv, env

def image_repository(image: str) -> tuple[str, str]:
    """'netplane/echo:v2' -> ('netplane/echo', 'v2'); digests and a docker.io/ prefix are accepted."""
    name = image.split("@", 1)[0]
    repo, tag = name, "latest"
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = name.rsplit(":", 1)
    for prefix in ("docker.io/", "index.docker.io/"):
        if repo.startswith(prefix):
            repo = repo[len(prefix):]
    return repo, tag


def is_builtin(image: str) -> bool:
    return image_repository(image)[0] in BUILTIN_IMAGES


def container_ports(container: dict) -> list[int]:
    ports = []
    for entry in container.get("ports") or []:
        port = entry.get("containerPort")
        if isinstance(port, int) and 0 < port < 65536 and port not in ports:
            ports.append(port)
    return ports


def serving_ports(container: dict) -> list[int]:
    """The ports a built-in server listens on: its containerPorts, or 8080 (echo's default)."""
    return container_ports(container) or [DEFAULT_ECHO_PORT]


def netplane_entry() -> list[str]:
    """The `netplane` script pip put next to our interpreter (or `python -m netplane`)."""
    script = os.path.join(os.path.dirname(sys.executable), "netplane")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "netplane"]


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known names are replaced, unknown stay, `$$` escapes `$`."""
    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return _VAR_REF.sub(replace, text)


# Images whose default command is a shell, which `kubectl debug` and `kubectl run -it` users name without one.
SHELL_IMAGES = frozenset({"busybox", "alpine", "debian", "ubuntu", "nicolaka/netshoot"})


def container_argv(container: dict, env: dict[str, str], entry: list[str] | None = None) -> list[str]:
    """The program and arguments of a container (k8s: command replaces, args append)."""
    image = container.get("image") or ""
    command = [str(c) for c in container.get("command") or []]
    args = [str(a) for a in container.get("args") or []]
    if not command:
        repo, _ = image_repository(image)
        sub = BUILTIN_IMAGES.get(repo)
        if sub is None and args:
            # An image we do not run has no entrypoint here: its args are the command, as they are
            # for images without an ENTRYPOINT (busybox, alpine, debian: `kubectl run -it x --image=busybox -- sh`).
            return [expand(part, env) for part in args]
        if sub is None and repo.removeprefix("library/") in SHELL_IMAGES:
            # Nothing to run but the image's own default, a shell (`kubectl debug -it pod --image=busybox`):
            # this machine's.
            return ["sh"]
        if sub is None:
            raise ImageNotRunnable(
                f"image {image!r} cannot run here: netplane runs only its built-in images "
                f"({', '.join(sorted(BUILTIN_IMAGES))}) or containers that set command: or args:")
        command = [*(entry or netplane_entry()), *sub]
        if repo == "netplane/echo":
            command += [a for port in serving_ports(container) for a in ("--port", str(port))]
    return [expand(part, env) for part in command + args]


@dataclass(frozen=True)
class PodFacts:
    """What the agent knows about a pod and its node, for containers' environments."""
    pod_name: str
    namespace: str
    pod_ip: str
    node_name: str
    host_ip: str
    server: str
    service_account: str = "default"


def _field_ref(path: str, facts: PodFacts, pod: dict) -> str | None:
    meta = pod.get("metadata") or {}
    simple = {"metadata.name": facts.pod_name, "metadata.namespace": facts.namespace,
              "metadata.uid": meta.get("uid", ""), "spec.nodeName": facts.node_name,
              "status.podIP": facts.pod_ip, "status.hostIP": facts.host_ip,
              "spec.serviceAccountName": facts.service_account}
    if path in simple:
        return simple[path]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    return None


def container_env(container: dict, facts: PodFacts, pod: dict | None = None,
                  base: dict[str, str] | None = None) -> dict[str, str]:
    """The container's environment: a base (PATH), our pod facts, then the spec's env in order
    (later entries may refer to earlier ones with $(VAR); the spec wins over our defaults)."""
    ports = container_ports(container)
    env = dict(base or {})
    env.update({
        "POD_NAME": facts.pod_name, "POD_NAMESPACE": facts.namespace, "POD_IP": facts.pod_ip,
        "NODE_NAME": facts.node_name, "NETPLANE_SERVER": facts.server,
        "KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443",
        "NETPLANE_IMAGE": container.get("image") or "",
        "NETPLANE_CONTAINER_PORTS": ",".join(map(str, ports)),
    })
    for entry in container.get("env") or []:
        name = entry.get("name")
        if not name:
            continue
        if "value" in entry:
            env[name] = expand(str(entry.get("value") or ""), env)
        elif "valueFrom" in entry:
            ref = ((entry.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath", "")
            value = _field_ref(ref, facts, pod or {})
            if value is not None:
                env[name] = value
        else:
            env[name] = ""
    return env


def process_argv(netns: str, hostname: str, argv: list[str]) -> list[str]:
    """The full command line that runs `argv` in the pod: its netns, /etc files and hostname."""
    return ["ip", "netns", "exec", netns, "unshare", "--uts", "--",
            "sh", "-c", _SET_HOSTNAME, "netplane-pod", hostname, *argv]


# ---------------------------------------------------------------- pure: restarts

BACKOFF_BASE = 1.0
BACKOFF_MAX = 60.0
BACKOFF_RESET_AFTER = 120.0  # a container that ran this long starts its back-off afresh


def should_restart(restart_policy: str, exit_code: int) -> bool:
    if restart_policy == "Never":
        return False
    if restart_policy == "OnFailure":
        return exit_code != 0
    return True  # Always (the default)


def backoff_delay(consecutive_failures: int) -> float:
    """1 s, 2 s, 4 s ... capped: the CrashLoopBackOff wait before restart number N."""
    return min(BACKOFF_MAX, BACKOFF_BASE * (2 ** max(0, consecutive_failures - 1)))


# ---------------------------------------------------------------- pure: probes

@dataclass(frozen=True)
class Probe:
    kind: str  # "http", "tcp", "exec"
    port: int = 0
    path: str = "/"
    host: str = ""
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    command: tuple[str, ...] = ()
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3
    implicit: bool = False  # the built-in images' check: poll fast until the port first answers


class ProbeSpecError(ValueError):
    pass


def _resolve_port(port, container: dict, where: str) -> int:
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    for entry in container.get("ports") or []:
        if entry.get("name") == port and isinstance(entry.get("containerPort"), int):
            return entry["containerPort"]
    raise ProbeSpecError(f"{where}.port: {port!r} is neither a number nor a named containerPort")


def _first_tcp_port(container: dict) -> int | None:
    declared = container.get("ports") or []
    if not declared:
        return DEFAULT_ECHO_PORT if image_repository(container.get("image") or "")[0] == "netplane/echo" else None
    for entry in declared:
        if (entry.get("protocol") or "TCP").upper() == "TCP" and isinstance(entry.get("containerPort"), int):
            return entry["containerPort"]
    return None  # UDP only: nothing a TCP check could see


def readiness_probe(container: dict) -> Probe | None:
    """The container's readiness check: its readinessProbe, else for built-in images an implicit
    TCP check of the first serving port (like an image HEALTHCHECK), else None (ready when running)."""
    if container.get("readinessProbe"):
        return parse_probe(container, "readinessProbe")
    port = _first_tcp_port(container)
    if port and is_builtin(container.get("image") or "") and not container.get("command"):
        return Probe(kind="tcp", port=port, period=2.0, implicit=True)
    return None


def liveness_probe(container: dict) -> Probe | None:
    """The container's livenessProbe (failing it restarts the container), or None."""
    return parse_probe(container, "livenessProbe") if container.get("livenessProbe") else None


def parse_probe(container: dict, field_name: str) -> Probe:
    spec = container.get(field_name) or {}
    where = f"containers[{container.get('name', '')}].{field_name}"
    timing = dict(initial_delay=float(spec.get("initialDelaySeconds") or 0),
                  period=float(spec.get("periodSeconds") or 10),
                  timeout=float(spec.get("timeoutSeconds") or 1),
                  success_threshold=int(spec.get("successThreshold") or 1),
                  failure_threshold=int(spec.get("failureThreshold") or 3))
    if "httpGet" in spec:
        http = spec["httpGet"] or {}
        headers = tuple((h.get("name", ""), str(h.get("value", ""))) for h in http.get("httpHeaders") or [])
        return Probe(kind="http", port=_resolve_port(http.get("port"), container, f"{where}.httpGet"),
                     path=http.get("path") or "/", host=http.get("host") or "",
                     scheme=(http.get("scheme") or "HTTP").upper(), headers=headers, **timing)
    if "tcpSocket" in spec:
        tcp = spec["tcpSocket"] or {}
        return Probe(kind="tcp", port=_resolve_port(tcp.get("port"), container, f"{where}.tcpSocket"),
                     host=tcp.get("host") or "", **timing)
    if "exec" in spec:
        command = tuple(str(c) for c in (spec["exec"] or {}).get("command") or [])
        if not command:
            raise ProbeSpecError(f"{where}.exec.command: must not be empty")
        return Probe(kind="exec", command=command, **timing)
    raise ProbeSpecError(f"{where}: needs one of httpGet, tcpSocket, exec")


@dataclass
class ProbeTracker:
    """Consecutive results -> passing or not, with the probe's success/failure thresholds.

    A readiness check starts failing (not ready until it passes); a liveness check starts passing
    (ready=True: alive until it fails failureThreshold times in a row)."""
    probe: Probe
    ready: bool = False
    successes: int = 0
    failures: int = 0

    def record(self, ok: bool) -> bool:
        """Record one result; True when readiness changed."""
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            new = self.ready or self.successes >= self.probe.success_threshold
        else:
            self.successes, self.failures = 0, self.failures + 1
            new = self.ready and self.failures < self.probe.failure_threshold
        changed, self.ready = new != self.ready, new
        return changed

    def next_delay(self) -> float:
        if self.probe.implicit and not self.ready:
            return 0.1  # a built-in server is usually listening within a few hundred ms
        return self.probe.period


# ---------------------------------------------------------------- shell: probes

async def run_probe(probe: Probe, pod_ip: str, netns: str) -> bool:
    """One probe attempt, from the node (as the kubelet probes), bounded by the probe's timeout."""
    try:
        if probe.kind == "exec":
            return await _probe_exec(probe, netns)
        return await asyncio.wait_for(_probe_network(probe, probe.host or pod_ip), probe.timeout)
    except (OSError, asyncio.TimeoutError, ValueError):
        return False


async def _probe_network(probe: Probe, host: str) -> bool:
    ssl_ctx = None
    if probe.kind == "http" and probe.scheme == "HTTPS":
        import ssl
        ssl_ctx = ssl.create_default_context()
        ssl_ctx.check_hostname, ssl_ctx.verify_mode = False, ssl.CERT_NONE  # kubelet does not verify
    reader, writer = await asyncio.open_connection(host, probe.port, ssl=ssl_ctx)
    try:
        if probe.kind == "tcp":
            return True
        headers = {"Host": f"{host}:{probe.port}", "User-Agent": "netplane-probe/0.1",
                   "Accept": "*/*", "Connection": "close", **dict(probe.headers)}
        request = f"GET {probe.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write((request + "\r\n").encode())
        status_line = await reader.readline()
        parts = status_line.split()
        return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400
    finally:
        writer.close()


async def _probe_exec(probe: Probe, netns: str) -> bool:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", netns, *probe.command,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return await asyncio.wait_for(proc.wait(), probe.timeout) == 0
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return False


# ---------------------------------------------------------------- shell: processes

@dataclass
class ContainerProcess:
    """A running container's main process (leader of its own process group); `terminal`: the master
    side of its pseudo-terminal, for a container with stdin and tty (kubectl run -it, attach)."""
    popen: subprocess.Popen
    exited: asyncio.Future = field(repr=False)
    terminal: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)

    def signal_group(self, sig: int) -> None:
        if self.popen.returncode is not None:
            return  # reaped: the pid may belong to someone else now
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    async def stop(self, grace: float) -> int:
        """SIGTERM the whole group, SIGKILL after `grace` seconds; the exit code."""
        self.signal_group(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.wait(), grace)
        except asyncio.TimeoutError:
            self.signal_group(signal.SIGKILL)
            return await self.wait()


def _spawn(argv: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)


def take_terminal() -> None:
    """In a child, after fork: its stdin (a new session's pseudo-terminal) becomes its controlling
    terminal, so ^C, ^Z and a hang-up reach what runs in it."""
    import fcntl
    import termios
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _spawn_on_terminal(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """`argv` on a new pseudo-terminal, its controlling one; the master."""
    master, slave = os.openpty()
    try:
        popen = subprocess.Popen(argv, env={**env, "TERM": env.get("TERM", "xterm")}, stdin=slave, stdout=slave,
                                 stderr=slave, start_new_session=True, close_fds=True, preexec_fn=take_terminal)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return popen, master


async def start_process(argv: list[str], env: dict[str, str], log_path: str,
                        terminal: bool = False) -> ContainerProcess:
    """Start `argv` (fork/exec in a thread) and watch its exit through a pidfd on the event loop.
    Its output goes to `log_path`, or (terminal) to a pseudo-terminal whose master the caller reads."""
    loop = asyncio.get_running_loop()
    master = None
    if terminal:
        popen, master = await loop.run_in_executor(None, _spawn_on_terminal, argv, env)
    else:
        popen = await loop.run_in_executor(None, _spawn, argv, env, log_path)
    exited: asyncio.Future = loop.create_future()
    try:
        pidfd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):
        loop.create_task(_poll_exit(popen, exited))
        return ContainerProcess(popen, exited, master)

    def on_exit() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if not exited.done():
            exited.set_result(exit_code(popen.wait()))  # exited already: wait() only reaps

    loop.add_reader(pidfd, on_exit)
    return ContainerProcess(popen, exited, master)


async def _poll_exit(popen: subprocess.Popen, exited: asyncio.Future) -> None:
    while popen.poll() is None:
        await asyncio.sleep(0.2)
    if not exited.done():
        exited.set_result(exit_code(popen.returncode))


def exit_code(returncode: int) -> int:
    """A container's exit code as Kubernetes shows it: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode
