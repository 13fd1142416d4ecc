"""`kubectl exec` and `kubectl attach`: a command in a pod's network namespace, or the pod's own
container, their streams over a WebSocket.

kubectl (1.30+) asks `GET .../pods/{name}/exec?command=...&stdin=...&stdout=...&stderr=...&tty=...`
with an Upgrade to WebSocket and the channel protocols it speaks (v5.channel.k8s.io, then
v4.channel.k8s.io). The API server finds the pod's node and opens the same WebSocket to that node's
agent (`/exec/{namespace}/{pod}/{container}` on its health port, as the kubelet's), then relays every
message both ways. The agent runs the command as it runs the pod's containers (its netns, /etc files
and hostname; processes, not images) and speaks the channel protocol:

- every binary message starts with its channel: 0 stdin, 1 stdout, 2 stderr, 3 the outcome (a
  metav1.Status as JSON, the last message), 4 a terminal resize ({"Width": w, "Height": h}), and in
  v5 255 a close (the client's stdin is done: [255, 0]);
- with tty the command gets a pseudo-terminal, and its output comes on stdout only.

Attach (`kubectl run -it`, `kubectl attach`) reaches a container's own process: a container whose spec
has stdin and tty runs on a pseudo-terminal (Terminal) whose output goes to its log and to every
attached client; any other container's attach shows what it writes from then on.

The agent's endpoint asks for no credentials (as podlogs.py says of its logs): whoever reaches a
node's address can run commands in its pods, a lab's trust model, not a production one.
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import struct
import termios
from dataclasses import dataclass

from netplane.podlogs import LogError

STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")   # the ones we speak, best first


class ExecError(LogError):
    """An exec or attach that cannot be done: `status` and Kubernetes' words (a LogError, as every
    refusal of the agent's pod endpoints is)."""


@dataclass(frozen=True)
class ExecRequest:
    command: tuple[str, ...]
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True
    tty: bool = False

    @classmethod
    def parse(cls, query, attach: bool = False) -> "ExecRequest":
        """From the query (a multidict: `command` repeats; none for attach); ExecError(400) names what
        is wrong."""
        command = tuple(query.getall("command", []))
        if not command and not attach:
            raise ExecError(400, "you must specify at least one command for the container")
        flag = lambda name, default: query.get(name, "true" if default else "false").lower() in ("true", "1")
        request = cls(command, flag("stdin", False), flag("stdout", True), flag("stderr", True), flag("tty", False))
        if not (request.stdin or request.stdout or request.stderr):
            raise ExecError(400, "you must specify at least 1 of stdin, stdout, stderr")
        if request.tty and request.stderr:   # kubectl does not ask for both; a terminal has one stream
            request = cls(command, request.stdin, request.stdout, False, True)
        return request

    def as_query(self) -> list[tuple[str, str]]:
        flags = [("stdin", self.stdin), ("stdout", self.stdout), ("stderr", self.stderr), ("tty", self.tty)]
        return [("command", c) for c in self.command] + [(k, "true" if v else "false") for k, v in flags]


def choose_protocol(offered: str) -> str | None:
    """The channel protocol to answer with, from the client's Sec-WebSocket-Protocol list."""
    asked = [p.strip() for p in offered.split(",") if p.strip()]
    return next((p for p in PROTOCOLS if p in asked), None)


def outcome(exit_code: int | None, command: tuple[str, ...], error: str | None = None) -> bytes:
    """The last message (channel 3): success, a non-zero exit code, or why it could not run."""
    if error is not None:
        status = {"metadata": {}, "status": "Failure", "message": error, "reason": "InternalError", "code": 500}
    elif exit_code == 0:
        status = {"metadata": {}, "status": "Success"}
    else:
        status = {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                  "message": f"command terminated with non-zero exit code: error executing command "
                             f"{list(command)}, exit code {exit_code}",
                  "details": {"causes": [{"reason": "ExitCode", "message": str(exit_code)}]}}
    return bytes([ERROR]) + json.dumps(status).encode()


def resize(fd: int, message: bytes) -> None:
    """Apply a channel-4 resize ({"Width": .., "Height": ..}) to a terminal; a bad one is ignored."""
    try:
        size = json.loads(message)
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", int(size["Height"]), int(size["Width"]), 0, 0))
    except (ValueError, KeyError, TypeError, OSError):
        pass


# ---- the agent's side: run it and speak the protocol ---------------------------------------------

async def run(ws, argv: list[str], request: ExecRequest, protocol: str) -> None:
    """Run `argv` (the full command line, in the pod) with its streams on WebSocket `ws` (aiohttp)."""
    from netplane import runtime
    loop = asyncio.get_running_loop()
    master, stdin = None, None
    try:
        if request.tty:   # as a terminal container starts (runtime: its controlling terminal, ^C reaches it)
            process = await runtime.start_process(argv, dict(os.environ), "", terminal=True)
            master, wait = process.terminal, process.wait
        else:
            pipe, null = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=pipe if request.stdin else null, stdout=pipe if request.stdout else null,
                stderr=pipe if request.stderr else null, start_new_session=True)
            stdin, wait = process.stdin, process.wait
    except OSError as err:
        await ws.send_bytes(outcome(None, request.command, f"cannot run {list(request.command)}: {err}"))
        return
    pumps = [asyncio.ensure_future(_from_client(ws, stdin, master, protocol))]
    if master is not None:
        pumps.append(asyncio.ensure_future(_from_terminal(ws, loop, master)))
    else:
        for stream, channel in ((process.stdout, STDOUT), (process.stderr, STDERR)):
            if stream is not None:
                pumps.append(asyncio.ensure_future(_from_stream(ws, stream, channel)))
    waiter = asyncio.ensure_future(wait())
    try:
        await asyncio.wait([waiter, pumps[0]], return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():   # the client went away first: so does the command, as on a hang-up
            _kill_group(process.pid)
            await waiter
            return
        await asyncio.gather(*pumps[1:], return_exceptions=True)   # the output, to its end
        await ws.send_bytes(outcome(waiter.result(), request.command))
    finally:
        pumps[0].cancel()
        if not waiter.done():
            _kill_group(process.pid)
            await waiter
        if master is not None:
            os.close(master)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)   # the command leads its own session and group
    except ProcessLookupError:
        pass


async def _from_client(ws, stdin, master: int | None, protocol: str) -> None:
    """Client messages: stdin (to the pipe or the terminal), resizes, and in v5 the close of stdin."""
    async for message in ws:
        data = message.data if isinstance(message.data, bytes) else str(message.data).encode()
        if not data:
            continue
        channel, payload = data[0], data[1:]
        if channel == STDIN:
            try:
                if master is not None:
                    os.write(master, payload)
                elif stdin is not None and not stdin.is_closing():
                    stdin.write(payload)
                    await stdin.drain()
            except (BrokenPipeError, ConnectionResetError, OSError):
                pass   # the command stopped reading (or exited): its input is dropped
        elif channel == RESIZE and master is not None:
            resize(master, payload)
        elif channel == CLOSE and protocol.startswith("v5") and payload[:1] == bytes([STDIN]):
            if master is not None:
                os.write(master, b"\x04")   # ^D: end of input on a terminal
            elif stdin is not None:
                stdin.close()
    if stdin is not None and master is None:   # the client went away: no more input
        stdin.close()


async def _from_stream(ws, stream, channel: int) -> None:
    while chunk := await stream.read(65536):
        await ws.send_bytes(bytes([channel]) + chunk)


async def _from_terminal(ws, loop, master: int) -> None:
    """The terminal's output; it ends (EIO) once the command and everything it started have exited."""
    chunks: asyncio.Queue = asyncio.Queue()

    def readable() -> None:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            loop.remove_reader(master)
        chunks.put_nowait(chunk)

    loop.add_reader(master, readable)
    try:
        while chunk := await chunks.get():
            await ws.send_bytes(bytes([STDOUT]) + chunk)
    finally:
        loop.remove_reader(master)


# ---- attach: the streams of the container's own process ------------------------------------------

class Terminal:
    """The pseudo-terminal of a container with stdin and tty (`kubectl run -it`): what the container
    writes goes to its log and to every attached client, what a client types goes to it."""

    def __init__(self, master: int, log_path: str):
        self.master = master
        self.log = open(log_path, "ab", buffering=0)   # O_APPEND: rotation cuts it like any log
        self.watchers: set[asyncio.Queue] = set()
        self.closed = False
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(master, self._readable)

    def _readable(self) -> None:
        try:
            chunk = os.read(self.master, 65536)
        except OSError:   # EIO: the container and all it started have let go of the terminal
            chunk = b""
        if not chunk:
            return self.close()
        self.log.write(chunk)
        for queue in self.watchers:
            queue.put_nowait(chunk)

    def watch(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        if self.closed:
            queue.put_nowait(b"")
        self.watchers.add(queue)
        return queue

    def type(self, data: bytes) -> None:
        if not self.closed:
            os.write(self.master, data)

    def resize(self, message: bytes) -> None:
        if not self.closed:
            resize(self.master, message)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.master)
        os.close(self.master)
        self.log.close()
        for queue in self.watchers:
            queue.put_nowait(b"")


async def attach(ws, terminal: Terminal | None, log_path: str, running, exited: asyncio.Future,
                 command: tuple[str, ...]) -> None:
    """Attach `ws` to a container: its terminal both ways, or (no terminal) its output as it is logged
    from now on; the outcome once it stops."""
    from netplane import podlogs
    try:
        if terminal is not None:
            if not await _attached_to_terminal(ws, terminal):
                return   # the client left; the container goes on
        else:
            start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
            await podlogs.follow(log_path, start, running, lambda data: ws.send_bytes(bytes([STDOUT]) + data), None)
    except ConnectionResetError:
        return
    try:
        exit_code = await asyncio.wait_for(asyncio.shield(exited), 5)
    except asyncio.TimeoutError:
        exit_code = None
    await ws.send_bytes(outcome(exit_code, command) if exit_code is not None else
                        outcome(None, command, "the container is still running; its terminal closed"))


async def _attached_to_terminal(ws, terminal: Terminal) -> bool:
    """Relay until the terminal closes (True) or the client leaves (False)."""
    queue = terminal.watch()
    typing = asyncio.ensure_future(_typing(ws, terminal))
    try:
        while True:
            chunk = asyncio.ensure_future(queue.get())
            await asyncio.wait([chunk, typing], return_when=asyncio.FIRST_COMPLETED)
            if not chunk.done():
                chunk.cancel()
                return False
            if not chunk.result():
                return True
            await ws.send_bytes(bytes([STDOUT]) + chunk.result())
    finally:
        terminal.watchers.discard(queue)
        typing.cancel()


async def _typing(ws, terminal: Terminal) -> None:
    async for message in ws:
        data = message.data if isinstance(message.data, bytes) else str(message.data).encode()
        if data[:1] == bytes([STDIN]):
            terminal.type(data[1:])
        elif data[:1] == bytes([RESIZE]):
            terminal.resize(data[1:])
