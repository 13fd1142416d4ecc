"""Run a command and collect its output, without importing subprocess.

The plugin is exec'd once per pod and its whole ADD should cost about what the reference Go plugin's
does (~10-40 ms). `subprocess` (and netplane.netns, which uses it) costs ~8 ms to import, so this
module does the same job with os.posix_spawn, pipes and select. Commands are argument lists; a
failure carries the command and its output.
"""
from __future__ import annotations

import os
import select

_SBIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
_SIGPIPE = 13   # the `signal` module would import enum; the number is fixed on Linux
_found: dict = {}


class ProcError(RuntimeError):
    def __init__(self, argv, returncode: int, stdout: str, stderr: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        output = (stderr or stdout).strip()
        super().__init__(f"command {' '.join(self.argv)!r} failed with exit code {returncode}: {output}")


def which(name: str) -> str | None:
    """The path of an executable, searching PATH and then the sbin directories (a runtime may exec
    the plugin with a PATH that lacks /usr/sbin, where ip and nft live)."""
    if "/" in name:
        return name
    if name not in _found:
        dirs = [d for d in os.environ.get("PATH", "").split(":") if d] + list(_SBIN_DIRS)
        _found[name] = next((os.path.join(d, name) for d in dirs
                             if os.access(os.path.join(d, name), os.X_OK)), None)
    return _found[name]


def run(argv, input: str | None = None, check: bool = True, env=None) -> tuple:
    """Run argv; returns (returncode, stdout, stderr); raises ProcError when check and it failed."""
    path = which(argv[0])
    if path is None:
        raise ProcError(argv, 127, "", f"{argv[0]}: not found")
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    # os.pipe() descriptors are close-on-exec; dup2 onto 0/1/2 makes just those three survive exec.
    actions = [(os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
               (os.POSIX_SPAWN_DUP2, err_w, 2)]
    try:
        # setsigdef: Python ignores SIGPIPE, and an ignored signal would stay ignored in the child.
        pid = os.posix_spawn(path, list(argv), os.environ if env is None else env,
                             file_actions=actions, setsigdef=(_SIGPIPE,))
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)
    stdout, stderr = _communicate(in_w, out_r, err_r, (input or "").encode())
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    out, err = stdout.decode(errors="replace"), stderr.decode(errors="replace")
    if check and code != 0:
        raise ProcError(argv, code, out, err)
    return code, out, err


def _communicate(in_w: int, out_r: int, err_r: int, data: bytes) -> tuple:
    chunks = {out_r: [], err_r: []}
    readers = [out_r, err_r]
    writers = [in_w] if data else []
    if not data:
        os.close(in_w)
    while readers or writers:
        ready_r, ready_w, _ = select.select(readers, writers, [])
        for fd in ready_w:
            try:
                sent = os.write(fd, data[:65536])
            except BrokenPipeError:
                sent = len(data)
            data = data[sent:]
            if not data:
                os.close(fd)
                writers.remove(fd)
        for fd in ready_r:
            chunk = os.read(fd, 65536)
            if chunk:
                chunks[fd].append(chunk)
            else:
                os.close(fd)
                readers.remove(fd)
    return b"".join(chunks[out_r]), b"".join(chunks[err_r])
