"""`kubectl logs`: a container's output, from the node agent that runs it, through the API server.

The agent keeps each container's stdout and stderr in a file per run: the current one (rotated at
LOG_MAX_BYTES) and the one before (`previous_path`: a restarted container's last run, what
`kubectl logs --previous` shows after a crash); it serves them as the kubelet does, at `GET /containerLogs/{namespace}/{pod}/{container}`
on its health port, which it publishes in its Node's `status.daemonEndpoints.kubeletEndpoint.Port`.
The API server answers `GET .../pods/{name}/log` by finding the pod's node and passing that request
on (pods/log). Like the kubelet's old read-only port, the agent's endpoint asks for no credentials:
anyone who reaches a node's address can read its pods' logs (a lab's trust model).

Query parameters, as Kubernetes has them: container, tailLines, limitBytes, follow, previous.
(timestamps and sinceSeconds are not kept.)
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

FOLLOW_POLL_SECONDS = 0.25
_TAIL_BLOCK = 64 * 1024
# A container log over this size is rotated: copied to <log>.1 (replacing the one before) and cut to
# zero, so a chatty pod (an ingress's access log under load) keeps at most twice this on the node,
# as the kubelet's containerLogMaxSize bounds its logs. Cutting, not renaming: the process keeps
# writing through its descriptor, opened O_APPEND, so its next line lands at the start of the file.
LOG_MAX_BYTES = 10 * 1024 * 1024


class LogError(Exception):
    """A request to a pod's logs (or exec, attach) that cannot be answered: `status` (400, 404, ...)
    and Kubernetes' words."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class LogQuery:
    tail_lines: int | None = None
    limit_bytes: int | None = None
    follow: bool = False
    previous: bool = False

    @classmethod
    def parse(cls, query) -> "LogQuery":
        """From request query parameters (a mapping of strings); LogError(400) names what is wrong."""
        flag = lambda name: query.get(name, "false").lower() in ("true", "1")
        return cls(tail_lines=_count(query, "tailLines"), limit_bytes=_count(query, "limitBytes", minimum=1),
                   follow=flag("follow") and not flag("previous"), previous=flag("previous"))

    def as_query(self) -> dict[str, str]:
        out = {}
        if self.tail_lines is not None:
            out["tailLines"] = str(self.tail_lines)
        if self.limit_bytes is not None:
            out["limitBytes"] = str(self.limit_bytes)
        if self.follow:
            out["follow"] = "true"
        if self.previous:
            out["previous"] = "true"
        return out


def _count(query, name: str, minimum: int = 0) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise LogError(400, f"{name}: invalid value {raw!r}: must be an integer") from None
    if value < minimum:
        raise LogError(400, f"{name}: invalid value {value}: must be greater than or equal to {minimum}")
    return value


# ---- pure: which container, which part of the file ------------------------------------------------

def container_of(pod: dict, wanted: str | None) -> str:
    """The container a log request is for: `wanted`, or the pod's only one (Kubernetes' errors)."""
    name = (pod.get("metadata") or {}).get("name", "")
    spec = pod.get("spec") or {}
    names = [c.get("name") for c in spec.get("containers") or [] if isinstance(c, dict)]
    ephemeral = [c.get("name") for c in spec.get("ephemeralContainers") or [] if isinstance(c, dict)]
    if wanted:
        if wanted not in names + ephemeral:   # kubectl debug attaches to its ephemeral container by name
            raise LogError(400, f'container "{wanted}" in pod "{name}" is not valid')
        return wanted
    if len(names) != 1:
        raise LogError(400, f"a container name must be specified for pod {name}, choose one of: "
                            f"[{' '.join(names)}]")
    return names[0]


def agent_url(node: dict, path: str) -> str:
    """An address of the node's agent (its InternalIP, its daemonEndpoints port): logs, exec."""
    status = node.get("status") or {}
    address = next((a.get("address") for a in status.get("addresses") or [] if a.get("type") == "InternalIP"), "")
    port = ((status.get("daemonEndpoints") or {}).get("kubeletEndpoint") or {}).get("Port")
    node_name = (node.get("metadata") or {}).get("name", "")
    if not address or not port:
        raise LogError(503, f"node {node_name} publishes no address and port for its agent "
                            "(status.daemonEndpoints.kubeletEndpoint.Port: its agent runs without --health-listen)")
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}{path}"


def tail(data: bytes, lines: int) -> bytes:
    """The last `lines` lines of `data` (a last line without its newline counts as one)."""
    if lines <= 0:
        return b""
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    cut = end
    for _ in range(lines):
        cut = data.rfind(b"\n", 0, cut)
        if cut < 0:
            return data
    return data[cut + 1:]


def read_log(path: str, query: LogQuery) -> tuple[bytes, int]:
    """(what to send first, the file offset after it): the tail and limit applied."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if query.tail_lines is None:
                data = f.read()
            else:
                data = _last_lines(f, size, query.tail_lines)
    except FileNotFoundError:
        data, size = b"", 0
    if query.limit_bytes is not None:
        data = data[:query.limit_bytes]
    return data, size


def _last_lines(f, size: int, lines: int) -> bytes:
    """Read back from the end in blocks until `lines` lines are in hand (a log can be large)."""
    start, data = size, b""
    while start > 0 and data.count(b"\n") <= lines:
        step = min(_TAIL_BLOCK, start)
        start -= step
        f.seek(start)
        data = f.read(step) + data
    return tail(data, lines)


def previous_path(path: str) -> str:
    """Where a container's last run's log goes when it starts again."""
    return path[:-len(".log")] + ".previous.log" if path.endswith(".log") else path + ".previous"


def start_new_run(path: str) -> None:
    """A container starts again: its log so far becomes the previous run's (the older rotated part,
    of runs before that, goes), and the new run writes a fresh file."""
    try:
        os.replace(path, previous_path(path))
    except FileNotFoundError:
        return
    try:
        os.unlink(path + ".1")
    except FileNotFoundError:
        pass


def rotate_if_large(path: str, max_bytes: int | None = None) -> bool:
    """Copy-truncate `path` when it holds more than `max_bytes` (LOG_MAX_BYTES); whether it did. (Lines
    written between the copy and the cut are lost: the price of rotating a file a process keeps open.)"""
    try:
        if os.path.getsize(path) <= (LOG_MAX_BYTES if max_bytes is None else max_bytes):
            return False
        with open(path, "rb") as src, open(path + ".1", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.truncate(path, 0)
        return True
    except FileNotFoundError:
        return False


async def follow(path: str, offset: int, still_running, write, limit: int | None,
                 rotations=lambda: 0) -> None:
    """After the first part: send what the file grows by until the container stops (`still_running()`
    false with nothing new) or `limit` bytes went out. `write(bytes)` is awaited. `rotations()` counts
    the rotations of this log (done on this event loop, so never half-way as seen from here)."""
    sent = 0
    seen_rotations = rotations()
    while limit is None or sent < limit:
        if rotations() != seen_rotations:
            seen_rotations, offset = rotations(), 0   # rotated meanwhile: go on from its new start
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size < offset:
                    offset = 0   # cut by someone else
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            data = b""
        if data:
            if limit is not None:
                data = data[:limit - sent]
            offset += len(data)
            sent += len(data)
            await write(data)
            continue
        if not still_running():
            return
        await asyncio.sleep(FOLLOW_POLL_SECONDS)
