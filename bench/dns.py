"""DNS benchmark: netplane dns against dnsmasq, the same 1,000 names, measured in one run by dnsperf.

    .venv/bin/python bench/dns.py [--names 1000] [--duration 10] [--rounds 3] [--clients 4]
                                  [--outstanding 100] [--workers 1] [--skip-forward]

Run 1, cluster names: `netplane dns serve --objects` with 1,000 ClusterIP Services, and dnsmasq
serving the same 1,000 names from a hosts file. Run 2, forwarded names: both forward to the same
upstream (a third dnsmasq serving 1,000 outside names with a 300 s TTL); both caches are warmed with
one pass first, so this measures answering from the forwarder's cache.

For each server, ROUNDS runs at full load (dnsperf -c CLIENTS -q OUTSTANDING, as fast as it goes;
the order alternates): queries per second, average latency, and the server's own CPU time per query
(from /proc: the figure the load generator does not cap); then p50/p99 latency at one fixed load for
both (half the slower server's rate, dnsperf -v), so the latency figures compare like with like.
dnsperf runs on the same CPUs as the servers: with 2 CPUs, one goes to dnsperf, which then caps the
rate whatever the server (about 250k qps here). The load average and the CPU other processes use
are printed first: on a shared machine, compare figures from quiet runs only.
Needs dnsperf and dnsmasq (Debian: dnsperf, dnsmasq-base).
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from netplane import netns
from netplane.dns.testing import ServerProcess


@dataclass
class Figures:
    qps: list[float] = field(default_factory=list)  # one per round, at full load
    avg_ms: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # the server's CPU time per answered query
    dnsperf_cpus: list[float] = field(default_factory=list)  # near 1.0: the load generator is the limit
    others: list[float] = field(default_factory=list)  # CPUs other processes used during the round
    p50_ms: float = 0.0  # at a fixed load
    p99_ms: float = 0.0

    @property
    def median_qps(self) -> float:
        return statistics.median(self.qps)


def free_port() -> int:
    """A loopback port free for both UDP and TCP (dnsmasq takes both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no loopback port free for both UDP and TCP")


def write_inputs(workdir: Path, count: int) -> None:
    services, hosts, cluster_queries, outside_hosts, outside_queries = [], [], [], [], []
    for i in range(count):
        ip = f"10.96.{10 + i // 250}.{1 + i % 250}"
        name = f"svc-{i:04d}"
        services.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "bench"},
                         "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}})
        hosts.append(f"{ip} {name}.bench.svc.cluster.local")
        cluster_queries.append(f"{name}.bench.svc.cluster.local A")
        outside_hosts.append(f"198.18.{i // 250}.{1 + i % 250} host-{i:04d}.example.test")
        outside_queries.append(f"host-{i:04d}.example.test A")
    (workdir / "objects.yaml").write_text(yaml.safe_dump_all(services))
    for name, lines in [("cluster.hosts", hosts), ("cluster.queries", cluster_queries),
                        ("outside.hosts", outside_hosts), ("outside.queries", outside_queries)]:
        (workdir / name).write_text("\n".join(lines) + "\n")


def start_dnsmasq(workdir: Path, port: int, *options: str) -> subprocess.Popen:
    argv = ["dnsmasq", "--no-daemon", f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
            "--no-resolv", "--no-hosts", "--user=root", f"--pid-file={workdir}/dnsmasq-{port}.pid",
            "--log-facility=/dev/null", *options]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_answering(port: int, name: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = netns.run(["dig", "@127.0.0.1", "-p", str(port), "+short", "+time=1", "+tries=1", name],
                        check=False).stdout
        if out.strip() and not out.startswith(";"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"no answer for {name} on port {port}")


def dnsperf(port: int, queries: Path, *args: str) -> str:
    argv = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), *args]
    return netns.run(argv, timeout=600).stdout


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes and their threads so far."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(busy, softirq) clock ticks of the whole machine so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values) - values[3] - values[4], values[6]  # all but idle and iowait; softirq


def machine_busy(seconds: float = 1.0) -> float:
    """CPUs' worth of time the whole machine spent busy over `seconds` (0.0 .. number of CPUs)."""
    before = machine_ticks()[0]
    time.sleep(seconds)
    return (machine_ticks()[0] - before) / os.sysconf("SC_CLK_TCK") / seconds


def full_load(port: int, pids: list[int], queries: Path, args) -> tuple[float, float, float, float, float]:
    """(queries per second, average latency ms, server CPU microseconds per query, CPUs dnsperf
    used, CPUs other processes used meanwhile), as fast as dnsperf goes with CLIENTS sockets and
    OUTSTANDING queries in flight."""
    cpu_before, machine_before = cpu_seconds(pids), machine_ticks()
    dnsperf_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    out = dnsperf(port, queries, "-c", str(args.clients), "-q", str(args.outstanding), "-l", str(args.duration))
    elapsed = time.monotonic() - started
    dnsperf_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu, machine_after = cpu_seconds(pids) - cpu_before, machine_ticks()
    dnsperf_cpu = (dnsperf_after.ru_utime + dnsperf_after.ru_stime
                   - dnsperf_before.ru_utime - dnsperf_before.ru_stime)
    tick = os.sysconf("SC_CLK_TCK")
    busy = (machine_after[0] - machine_before[0] - (machine_after[1] - machine_before[1])) / tick
    others = max(0.0, busy - cpu - dnsperf_cpu) / elapsed  # softirq left out: mostly our own packets
    qps = avg = completed = 0.0
    for line in out.splitlines():
        if "Queries per second:" in line:
            qps = float(line.split(":")[1])
        elif "Average Latency (s):" in line:
            avg = float(line.split(":")[1].split()[0]) * 1000
        elif "Queries completed:" in line:
            completed = float(line.split(":")[1].split()[0])
    if not qps:
        raise RuntimeError(f"dnsperf gave no figures:\n{out}")
    check_response_codes(out)
    return qps, avg, cpu / completed * 1e6, dnsperf_cpu / elapsed, others


def check_response_codes(out: str) -> None:
    """Fast REFUSED or SERVFAIL answers must not count as queries per second: all NOERROR, or fail."""
    line = next((l for l in out.splitlines() if "Response codes:" in l), "")
    codes = {code: int(count) for code, count in re.findall(r"([A-Z]+) (\d+) \(", line)}
    wrong = {code: count for code, count in codes.items() if code != "NOERROR" and count}
    if not codes or wrong:
        raise RuntimeError(f"dnsperf saw answers other than NOERROR: {line.strip() or out}")


def fixed_load(port: int, queries: Path, clients: int, rate: int, duration: int) -> tuple[float, float]:
    out = dnsperf(port, queries, "-c", str(clients), "-l", str(duration), "-Q", str(rate), "-v")
    latencies = sorted(float(line.split()[-1]) for line in out.splitlines() if line.startswith("> "))
    if not latencies:
        return 0.0, 0.0
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return pick(0.50), pick(0.99)


def measure(servers: dict[str, tuple[int, list[int]]], queries: Path, args) -> dict[str, Figures]:
    """Rounds of full load, each server in turn, the order alternating (neither always goes first
    into a warm or a busy machine); then p50/p99 of each at the same fixed load, half the slower
    server's median rate."""
    figures = {name: Figures() for name in servers}
    for round_ in range(args.rounds):
        order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
        for name in order:
            port, pids = servers[name]
            qps, avg, cpu_us, dnsperf_cpus, others = full_load(port, pids, queries, args)
            figures[name].dnsperf_cpus.append(dnsperf_cpus)
            figures[name].others.append(others)
            figures[name].qps.append(qps)
            figures[name].avg_ms.append(avg)
            figures[name].cpu_us.append(cpu_us)
    rate = int(min(f.median_qps for f in figures.values()) / 2)
    for name, (port, _) in servers.items():
        figures[name].p50_ms, figures[name].p99_ms = fixed_load(port, queries, args.clients, rate,
                                                                max(2, args.duration // 2))
    return figures


def report(title: str, figures: dict[str, Figures]) -> None:
    print(f"\n{title}")
    print(f"  {'server':<10}{'qps (median)':>13}{'qps each round':>28}{'avg ms':>8}{'CPU us/q':>10}"
          f"{'dnsperf CPUs':>14}{'p50 ms':>8}{'p99 ms':>8}")
    for name, f in figures.items():
        rounds = " ".join(f"{q / 1000:.0f}k" + ("*" if o > 0.1 else "") for q, o in zip(f.qps, f.others))
        print(f"  {name:<10}{f.median_qps:>13.0f}{rounds:>28}{statistics.median(f.avg_ms):>8.3f}"
              f"{statistics.median(f.cpu_us):>10.2f}{statistics.median(f.dnsperf_cpus):>14.2f}"
              f"{f.p50_ms:>8.3f}{f.p99_ms:>8.3f}")
    ours, theirs = figures["netplane"], figures["dnsmasq"]
    each = " ".join(f"{a / b:.2f}" for a, b in zip(ours.qps, theirs.qps))
    print(f"  ratio netplane/dnsmasq: {ours.median_qps / theirs.median_qps:.2f}x queries per second "
          f"(rounds: {each}); {statistics.median(theirs.cpu_us) / statistics.median(ours.cpu_us):.2f}x "
          "fewer CPU microseconds per query")
    if any(o > 0.1 for f in figures.values() for o in f.others):
        print("  * other processes used more than 0.1 CPU during that round: " + ", ".join(
            f"{name} {' '.join(f'{o:.2f}' for o in f.others)}" for name, f in figures.items()))


def server_pids(proc: subprocess.Popen) -> list[int]:
    """The server and its worker processes (--workers: children of the first)."""
    pids = [proc.pid]
    for task in Path(f"/proc/{proc.pid}/task").iterdir():
        children = (task / "children").read_text().split()
        pids += [int(pid) for pid in children]
    return pids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--names", type=int, default=1000)
    p.add_argument("--duration", type=int, default=10, help="seconds per full-load run")
    p.add_argument("--rounds", type=int, default=3, help="full-load runs per server (alternating order)")
    p.add_argument("--clients", type=int, default=4, help="dnsperf -c: client sockets")
    p.add_argument("--outstanding", type=int, default=100, help="dnsperf -q: queries in flight (100: its default)")
    p.add_argument("--workers", type=int, default=1, help="netplane dns serve --workers")
    p.add_argument("--skip-forward", action="store_true", help="only the cluster-name run")
    args = p.parse_args(argv)
    missing = [tool for tool in ("dnsperf", "dnsmasq", "dig") if shutil.which(tool) is None]
    if missing:
        print(f"bench/dns.py: missing {', '.join(missing)} (apt-get install dnsperf dnsmasq-base dnsutils)",
              file=sys.stderr)
        return 2
    print(f"dnsperf -c {args.clients} -q {args.outstanding}, {args.rounds} x {args.duration}s per server; "
          f"{args.names} names; netplane --workers {args.workers}; dnsmasq {dnsmasq_version()}; "
          f"{cpu_count()} CPUs shared by the servers and dnsperf")
    busy = machine_busy()
    print(f"before: load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"other processes busy {busy:.2f} CPUs" + ("  (WARNING: a busy machine; figures are low)" if busy > 0.1 else ""))
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="np-bench-dns-") as tmp:
        workdir = Path(tmp)
        write_inputs(workdir, args.names)
        try:
            with ServerProcess("--objects", str(workdir / "objects.yaml"), "--workers", str(args.workers),
                               health=False) as ours:
                theirs = free_port()
                procs.append(start_dnsmasq(workdir, theirs, f"--addn-hosts={workdir}/cluster.hosts", "--local-ttl=5"))
                wait_answering(ours.port, "svc-0000.bench.svc.cluster.local")
                wait_answering(theirs, "svc-0000.bench.svc.cluster.local")
                servers = {"netplane": (ours.port, server_pids(ours.proc)), "dnsmasq": (theirs, [procs[-1].pid])}
                report("cluster names (netplane: zone table; dnsmasq: hosts file)",
                       measure(servers, workdir / "cluster.queries", args))
            if not args.skip_forward:
                forward_run(workdir, args, procs)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=10)
    print(f"after: load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def forward_run(workdir: Path, args, procs: list) -> None:
    upstream = free_port()
    procs.append(start_dnsmasq(workdir, upstream, f"--addn-hosts={workdir}/outside.hosts", "--local-ttl=300"))
    wait_answering(upstream, "host-0000.example.test")
    with ServerProcess("--objects", str(workdir / "objects.yaml"), "--upstream", f"127.0.0.1:{upstream}",
                       "--workers", str(args.workers), health=False) as ours:
        theirs = free_port()
        procs.append(start_dnsmasq(workdir, theirs, f"--server=127.0.0.1#{upstream}", "--cache-size=10000"))
        servers = {"netplane": (ours.port, server_pids(ours.proc)), "dnsmasq": (theirs, [procs[-1].pid])}
        for port, _ in servers.values():
            wait_answering(port, "host-0000.example.test")
            dnsperf(port, workdir / "outside.queries", "-n", "1")  # warm the cache
        report("forwarded names (both forwarding to one dnsmasq upstream, answered from their caches)",
               measure(servers, workdir / "outside.queries", args))


def dnsmasq_version() -> str:
    out = netns.run(["dnsmasq", "--version"], check=False).stdout
    return out.split()[2] if out.startswith("Dnsmasq version") else "?"


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
