"""DNS benchmark: netplane dns against dnsmasq, the same 1,000 names, measured in one run by dnsperf.

    .venv/bin/python bench/dns.py [--names 1000] [--duration 10] [--clients 4] [--skip-forward]

Run 1, cluster names: `netplane dns serve --objects` with 1,000 ClusterIP Services, and dnsmasq
serving the same 1,000 names from a hosts file. Run 2, forwarded names: both forward to the same
upstream (a third dnsmasq serving 1,000 outside names with a 300 s TTL); both caches are warmed with
one pass first, so this measures answering from the forwarder's cache.

For each server: queries per second and average latency at full load (dnsperf -c CLIENTS, as fast as
it can), and p50/p99 latency at a fixed load (half the slower server's rate, dnsperf -v), so the
latency figures compare like with like. Needs dnsperf and dnsmasq (Debian: dnsperf, dnsmasq-base).
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from netplane import netns
from netplane.dns.testing import ServerProcess


@dataclass
class Figures:
    qps: float
    avg_ms: float
    p50_ms: float = 0.0
    p99_ms: float = 0.0


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


def full_load(port: int, queries: Path, clients: int, duration: int) -> Figures:
    out = dnsperf(port, queries, "-c", str(clients), "-l", str(duration))
    qps = avg = 0.0
    for line in out.splitlines():
        if "Queries per second:" in line:
            qps = float(line.split(":")[1])
        elif "Average Latency (s):" in line:
            avg = float(line.split(":")[1].split()[0]) * 1000
    if not qps:
        raise RuntimeError(f"dnsperf gave no figures:\n{out}")
    return Figures(qps, avg)


def fixed_load(port: int, queries: Path, clients: int, rate: int, duration: int) -> tuple[float, float]:
    out = dnsperf(port, queries, "-c", str(clients), "-l", str(duration), "-Q", str(rate), "-v")
    latencies = sorted(float(line.split()[-1]) for line in out.splitlines() if line.startswith("> "))
    if not latencies:
        return 0.0, 0.0
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return pick(0.50), pick(0.99)


def measure(servers: dict[str, int], queries: Path, clients: int, duration: int) -> dict[str, Figures]:
    figures = {name: full_load(port, queries, clients, duration) for name, port in servers.items()}
    rate = int(min(f.qps for f in figures.values()) / 2)
    for name, port in servers.items():
        figures[name].p50_ms, figures[name].p99_ms = fixed_load(port, queries, clients, rate, max(2, duration // 3))
    return figures


def report(title: str, figures: dict[str, Figures]) -> None:
    print(f"\n{title}")
    print(f"  {'server':<10}{'qps':>10}{'avg ms (full)':>15}{'p50 ms':>9}{'p99 ms':>9}"
          "   (p50/p99 at half the slower rate)")
    for name, f in figures.items():
        print(f"  {name:<10}{f.qps:>10.0f}{f.avg_ms:>15.3f}{f.p50_ms:>9.3f}{f.p99_ms:>9.3f}")
    ours, theirs = figures["netplane"], figures["dnsmasq"]
    print(f"  ratio netplane/dnsmasq: {ours.qps / theirs.qps:.2f}x queries per second")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--names", type=int, default=1000)
    p.add_argument("--duration", type=int, default=10, help="seconds per full-load run")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--skip-forward", action="store_true", help="only the cluster-name run")
    args = p.parse_args(argv)
    missing = [tool for tool in ("dnsperf", "dnsmasq", "dig") if shutil.which(tool) is None]
    if missing:
        print(f"bench/dns.py: missing {', '.join(missing)} (apt-get install dnsperf dnsmasq-base dnsutils)",
              file=sys.stderr)
        return 2
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="np-bench-dns-") as tmp:
        workdir = Path(tmp)
        write_inputs(workdir, args.names)
        try:
            with ServerProcess("--objects", str(workdir / "objects.yaml"), health=False) as ours:
                theirs = free_port()
                procs.append(start_dnsmasq(workdir, theirs, f"--addn-hosts={workdir}/cluster.hosts", "--local-ttl=5"))
                wait_answering(ours.port, "svc-0000.bench.svc.cluster.local")
                wait_answering(theirs, "svc-0000.bench.svc.cluster.local")
                print(f"dnsperf -c {args.clients}, {args.duration}s per server; {args.names} names; "
                      f"dnsmasq {dnsmasq_version()}; {cpu_count()} CPUs shared by servers and dnsperf")
                report("cluster names (netplane: zone table; dnsmasq: hosts file)",
                       measure({"netplane": ours.port, "dnsmasq": theirs}, workdir / "cluster.queries",
                               args.clients, args.duration))
            if not args.skip_forward:
                forward_run(workdir, args, procs)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=10)
    return 0


def forward_run(workdir: Path, args, procs: list) -> None:
    upstream = free_port()
    procs.append(start_dnsmasq(workdir, upstream, f"--addn-hosts={workdir}/outside.hosts", "--local-ttl=300"))
    wait_answering(upstream, "host-0000.example.test")
    with ServerProcess("--objects", str(workdir / "objects.yaml"), "--upstream", f"127.0.0.1:{upstream}",
                       health=False) as ours:
        theirs = free_port()
        procs.append(start_dnsmasq(workdir, theirs, f"--server=127.0.0.1#{upstream}", "--cache-size=10000"))
        servers = {"netplane": ours.port, "dnsmasq": theirs}
        for port in servers.values():
            wait_answering(port, "host-0000.example.test")
            dnsperf(port, workdir / "outside.queries", "-n", "1")  # warm the cache
        report("forwarded names (both forwarding to one dnsmasq upstream, answered from their caches)",
               measure(servers, workdir / "outside.queries", args.clients, args.duration))


def dnsmasq_version() -> str:
    out = netns.run(["dnsmasq", "--version"], check=False).stdout
    return out.split()[2] if out.startswith("Dnsmasq version") else "?"


def cpu_count() -> int:
    import os
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
