"""Container processes for real (no namespace needed): exit codes seen through a pidfd, stop with a
grace period, the whole process group reached, and processes that outlive their starter."""
from __future__ import annotations

import asyncio
import os
import signal
import time

from netplane import runtime


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def test_exit_code_is_reported_and_output_goes_to_the_log(tmp_path):
    log = tmp_path / "c.log"

    async def main():
        process = await runtime.start_process(["sh", "-c", "echo out; echo err >&2; exit 7"], {"PATH": os.environ["PATH"]},
                                              str(log))
        return await process.wait()
    assert run(main()) == 7
    assert log.read_text() == "out\nerr\n"


def test_stop_sends_sigterm_to_the_group_then_sigkill_after_grace(tmp_path):
    log = tmp_path / "c.log"
    # the leader ignores SIGTERM; its child (same group) does not
    script = "trap '' TERM; sleep 30 & echo $! > {child}; echo started; while :; do sleep 0.05; done"
    child_file = tmp_path / "child"

    async def main():
        process = await runtime.start_process(["sh", "-c", script.format(child=child_file)],
                                              {"PATH": os.environ["PATH"]}, str(log))
        deadline = time.monotonic() + 5
        while "started" not in log.read_text() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        child = int(child_file.read_text())
        started = time.monotonic()
        code = await process.stop(grace=0.3)
        return code, child, time.monotonic() - started

    code, child, took = run(main())
    assert code == 128 + signal.SIGKILL and 0.3 <= took < 5
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(child)  # the SIGTERM reached the group: the child sleep is gone


def test_a_process_outlives_the_event_loop_that_started_it(tmp_path):
    async def main():
        process = await runtime.start_process(["sleep", "30"], {"PATH": os.environ["PATH"]}, str(tmp_path / "c.log"))
        return process.pid
    pid = run(main())
    try:
        assert alive(pid)  # as containers outlive a kubelet restart
    finally:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
