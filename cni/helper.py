"""`python -m netplane.cni.helper [--name NAME]`: the node's resident netplane-cni helper.

It runs in a node's network namespace (the node agent starts it there, see `start`) and serves the
ADD and DEL that plugin execs forward to it (forward.py): the same plugin code (plugin.run), with the
exec's environment and stdin, but with everything already imported, so an exec costs little more than
the interpreter's start-up. It owns nothing: the IPAM directory and its lock, the links and the
masquerade table are the same ones a standalone exec uses, and either may serve any request.

One request at a time, in this one thread: the plugin enters pod namespaces with setns(2) for a
moment and forks to finish a veth deletion; both are simple in a single-threaded process. Only root
(or the helper's own user) may connect: the requests change the node's network.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import struct
import subprocess
import sys

from . import forward, link, plugin

_UCRED = "iII"   # struct ucred: pid, uid, gid
REQUEST_TIMEOUT = 30.0   # seconds an exec may take to send its request (a stopped one must not block us)


def serve(name: str, ready=None) -> None:
    """Accept and answer requests forever (until SIGTERM); `ready()` is called once listening."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(b"\0" + name.encode())
    listener.listen(256)
    if ready:
        ready()
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                if _peer_allowed(conn):
                    conn.settimeout(REQUEST_TIMEOUT)
                    request = forward.receive_all(conn)
                    conn.settimeout(None)
                    conn.sendall(handle(request))
            except OSError as e:   # the exec went away or stalled: it runs the command itself, or gives up
                print(f"netplane-cni helper: {e}", file=sys.stderr)
            except Exception:      # a bug: plugin.run answers its own errors; this one must not stop us
                import traceback
                traceback.print_exc()
        link.close_connections()
        _reap_detached_children()


def handle(request: bytes) -> bytes:
    """One wire request -> the wire reply (exit code byte + stdout)."""
    environ, stdin = parse_request(request)
    if environ.get("CNI_COMMAND", "").encode() not in forward.FORWARDED:
        return bytes([forward.NOT_HANDLED])
    code, out = plugin.run(environ, stdin)
    return bytes([code]) + out.encode()


def parse_request(request: bytes) -> tuple:
    """(environment dict, stdin bytes) from the wire format of forward.py."""
    if len(request) < 4:
        raise OSError("short request")
    length = int.from_bytes(request[:4], "little")
    block, stdin = request[4:4 + length], request[4 + length:]
    environ = {}
    for entry in block.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep:
            environ[key.decode(errors="surrogateescape")] = value.decode(errors="surrogateescape")
    return environ, stdin


def _peer_allowed(conn) -> bool:
    _, uid, _ = struct.unpack(_UCRED, conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      struct.calcsize(_UCRED)))
    return uid in (0, os.getuid())


def _reap_detached_children() -> None:
    """A DEL leaves a child finishing the kernel's clean-up (netlink.delete_link_detached); between
    requests nothing else of ours runs, so every exited child is one of those."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# ---- starting it, from the node agent or a test ----------------------------------------------------

def start(name: str = forward.DEFAULT_NAME, netns_cmd: list | None = None) -> subprocess.Popen:
    """Start a helper (in the caller's network namespace, or through `netns_cmd`, e.g. ["ip", "netns",
    "exec", "np-node"]) and return once it listens; stop it with .terminate() and .wait()."""
    argv = [*(netns_cmd or []), sys.executable, "-m", "netplane.cni.helper", "--name", name]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "listening":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"netplane-cni helper did not start (exit {proc.returncode}): {line!r}")
    return proc


def start_or_none(name: str = forward.DEFAULT_NAME) -> subprocess.Popen | None:
    """For the node agent: the helper, or None (with the reason on stderr) when it cannot start; the
    plugin execs then do the work themselves, as they do without an agent."""
    try:
        return start(name)
    except (OSError, RuntimeError) as e:
        print(f"netplane-cni helper not started ({e}); plugin execs will do the work themselves", file=sys.stderr)
        return None


def stop(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: when whoever started us (the node agent) dies, even by SIGKILL, so do we, and
    the node's namespace is not kept alive by a helper nobody will stop."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netplane.cni.helper", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=forward.DEFAULT_NAME,
                        help=f"abstract socket name (default {forward.DEFAULT_NAME}; the plugin reads "
                             f"{forward.HELPER_ENV})")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _die_with_parent()
    try:
        serve(args.name, ready=lambda: print("listening", flush=True))
    except OSError as e:
        print(f"netplane-cni helper: cannot listen on @{args.name}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
