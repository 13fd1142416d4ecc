"""`kubectl exec`: a command in a pod's network namespace, its streams over a WebSocket.

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

The agent's endpoint asks for no credentials (as podlogs.py says of its logs): whoever reaches a
node's address can run commands in its pods, a lab's trust model, not a production one.
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import os
import struct
import termios
from dataclasses import dataclass

STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")   # the ones we speak, best first


class ExecError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ExecRequest:
    command: tuple[str, ...]
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True
    tty: bool = False

    @classmethod
    def parse(cls, query) -> "ExecRequest":
        """From the query (a multidict: `command` repeats); ExecError(400) names what is wrong."""
        command = tuple(query.getall("command", []))
        if not command:
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
    loop = asyncio.get_running_loop()
    master = None
    try:
        if request.tty:
            master, slave = os.openpty()
            process = await asyncio.create_subprocess_exec(*argv, stdin=slave, stdout=slave, stderr=slave,
                                                           start_new_session=True)
            os.close(slave)
        else:
            pipe, null = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=pipe if request.stdin else null, stdout=pipe if request.stdout else null,
                stderr=pipe if request.stderr else null, start_new_session=True)
    except OSError as err:
        await ws.send_bytes(outcome(None, request.command, f"cannot run {list(request.command)}: {err}"))
        return
    pumps = [asyncio.ensure_future(_from_client(ws, process, master, protocol))]
    if master is not None:
        pumps.append(asyncio.ensure_future(_from_terminal(ws, loop, master)))
    else:
        for stream, channel in ((process.stdout, STDOUT), (process.stderr, STDERR)):
            if stream is not None:
                pumps.append(asyncio.ensure_future(_from_stream(ws, stream, channel)))
    try:
        exit_code = await process.wait()
        await asyncio.gather(*pumps[1:], return_exceptions=True)   # the output, to its end
        await ws.send_bytes(outcome(exit_code, request.command))
    finally:
        pumps[0].cancel()
        if process.returncode is None:
            process.kill()
            await process.wait()
        if master is not None:
            os.close(master)


async def _from_client(ws, process, master: int | None, protocol: str) -> None:
    """Client messages: stdin (to the pipe or the terminal), resizes, and in v5 the close of stdin."""
    async for message in ws:
        data = message.data if isinstance(message.data, bytes) else str(message.data).encode()
        if not data:
            continue
        channel, payload = data[0], data[1:]
        if channel == STDIN:
            if master is not None:
                os.write(master, payload)
            elif process.stdin is not None:
                process.stdin.write(payload)
                await process.stdin.drain()
        elif channel == RESIZE and master is not None:
            resize(master, payload)
        elif channel == CLOSE and protocol.startswith("v5") and payload[:1] == bytes([STDIN]):
            if master is not None:
                os.write(master, b"\x04")   # ^D: end of input on a terminal
            elif process.stdin is not None:
                process.stdin.close()
    if process.stdin is not None and master is None:   # the client went away: no more input
        process.stdin.close()


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
