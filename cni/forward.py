"""The launcher's first step: hand an ADD or DEL to the node's resident helper (helper.py), if one runs.

A plugin exec pays the interpreter's start-up (~7 ms) whatever it does; the plugin's imports (~4-5 ms)
and its work then compete for the CPU with everything else on the node. A helper that already has
them loaded does the work in ~2 ms, so the exec only forwards: its environment and stdin go over a
unix socket, the exit code and stdout come back. The helper listens on an abstract socket, which the
kernel scopes to a network namespace: the plugin, exec'd in a node's namespace, reaches exactly that
node's helper, and when there is none, connect() fails at once and the plugin runs the command itself.

This module imports only builtins and _socket: it runs before anything else in every exec.
Wire format (both ways over one connection): request = u32 length of the environment block,
the block ("K=V\\0" per variable), stdin; reply = one byte (the exit code, or NOT_HANDLED: run it
yourself), then stdout.
"""
import posix
from _socket import AF_UNIX, SHUT_WR, SOCK_CLOEXEC, SOCK_STREAM, socket

HELPER_ENV = "NETPLANE_CNI_HELPER"       # the helper's abstract socket name; empty: never forward
DEFAULT_NAME = "netplane-cni-helper"
FORWARDED = (b"ADD", b"DEL")             # the verbs worth a helper; the others always run here
NOT_HANDLED = 255


def address(environ) -> bytes | None:
    """The abstract socket address (leading NUL) from a bytes environment, or None when disabled."""
    name = environ.get(HELPER_ENV.encode(), DEFAULT_NAME.encode())
    return b"\0" + name if name else None


def forward_or_read_stdin() -> bytes | None:
    """Forward this exec's command to the helper and exit with its answer; when no helper takes it,
    return what was read of stdin (None: nothing was read) for the plugin to run the command itself."""
    environ = posix.environ
    where = address(environ) if environ.get(b"CNI_COMMAND") in FORWARDED else None
    if where is None:
        return None
    sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)
    try:
        sock.connect(where)
    except OSError:
        sock.close()
        return None
    stdin = _read_all(0)
    try:
        reply = _exchange(sock, environ, stdin)
    except OSError:
        reply = b""
    finally:
        sock.close()
    if not reply or reply[0] == NOT_HANDLED:
        # No helper answer (it declined, or died mid-way): run the command here. A half-done ADD is
        # then reported as this run finds it; the runtime's DEL after a failed ADD cleans up either way.
        return stdin
    _write_all(1, reply[1:])
    posix._exit(reply[0])


def request_bytes(environ, stdin: bytes) -> bytes:
    """The wire request for a bytes environment and stdin (helper.parse_request reads it)."""
    block = b"".join(key + b"=" + value + b"\0" for key, value in environ.items())
    return len(block).to_bytes(4, "little") + block + stdin


def _exchange(sock, environ, stdin: bytes) -> bytes:
    sock.sendall(request_bytes(environ, stdin))
    sock.shutdown(SHUT_WR)
    return receive_all(sock)


def receive_all(sock) -> bytes:
    """Everything the peer sends until it shuts its side (both ends of the wire format use it)."""
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = posix.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[posix.write(fd, data):]
