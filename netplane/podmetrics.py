"""`kubectl top`: CPU and memory of containers and nodes, as metrics-server serves them (metrics.k8s.io).

Each agent samples, every SAMPLE_SECONDS, the CPU time and resident memory of every process in each of
its containers' process groups (a container is a process group here, not a cgroup) and the machine's
own counters (/proc/stat, /proc/meminfo); usage is the CPU time spent between two samples over the time
between them (the `window`). It serves the latest at GET /stats/resource on its health port. The API
server answers `GET /apis/metrics.k8s.io/v1beta1/nodes` and `.../namespaces/NS/pods` by asking every
node's agent, as metrics-server scrapes every kubelet.

In a lab made of network namespaces every node is this one machine: each node's usage is the machine's.
Pure: parsing /proc and the usage arithmetic; `Sampler.sample` reads /proc.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

SAMPLE_SECONDS = 5.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def parse_stat(text: str) -> tuple[int, int]:
    """(process group, utime + stime ticks) from /proc/PID/stat (the name in parentheses may hold spaces)."""
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[2]), int(fields[11]) + int(fields[12])


def parse_statm(text: str) -> int:
    """Resident bytes from /proc/PID/statm."""
    return int(text.split()[1]) * PAGE_BYTES


def machine_busy_ticks(proc_stat: str) -> int:
    """All CPUs' non-idle ticks from /proc/stat's first line (user nice system idle iowait irq softirq steal)."""
    values = [int(v) for v in proc_stat.splitlines()[0].split()[1:9]]
    return sum(values) - values[3] - values[4]


def machine_used_bytes(meminfo: str) -> int:
    """MemTotal - MemAvailable from /proc/meminfo."""
    kib = {line.split(":")[0]: int(line.split()[1]) for line in meminfo.splitlines() if line.split()[1:2]}
    return (kib["MemTotal"] - kib.get("MemAvailable", kib.get("MemFree", 0))) * 1024


def nanocores(ticks_before: int, ticks_after: int, seconds: float) -> int:
    """CPU used between two samples, in billionths of a core."""
    if seconds <= 0:
        return 0
    return max(0, int((ticks_after - ticks_before) / CLOCK_TICKS / seconds * 1e9))


def quantity_cpu(value: int) -> str:
    return f"{value}n"


def quantity_memory(value: int) -> str:
    return f"{value // 1024}Ki"


@dataclass
class Usage:
    cpu_nanocores: int
    memory_bytes: int

    def as_usage(self) -> dict:
        return {"cpu": quantity_cpu(self.cpu_nanocores), "memory": quantity_memory(self.memory_bytes)}


@dataclass
class Sampler:
    """The latest usage of each container (by key) and of the machine, from the last two samples."""
    previous: dict = field(default_factory=dict)      # key -> (monotonic time, ticks)
    latest: dict = field(default_factory=dict)        # key -> Usage
    timestamp: str = ""
    window: float = 0.0

    def record(self, key, ticks: int, memory: int, now: float) -> None:
        before = self.previous.get(key)
        self.previous[key] = (now, ticks)
        if before is not None:
            self.latest[key] = Usage(nanocores(before[1], ticks, now - before[0]), memory)
            self.window = now - before[0]

    def forget_except(self, keys: set) -> None:
        for store in (self.previous, self.latest):
            for key in [k for k in store if k not in keys and k != "machine"]:
                del store[key]

    def sample(self, groups: dict) -> None:
        """groups: {key: process group id} of the containers running now."""
        now = time.monotonic()
        by_group = process_groups()
        for key, pgid in groups.items():
            ticks, memory = by_group.get(pgid, (0, 0))
            self.record(key, ticks, memory, now)
        self.forget_except(set(groups))
        try:
            with open("/proc/stat") as f:
                busy = machine_busy_ticks(f.read())
            with open("/proc/meminfo") as f:
                used = machine_used_bytes(f.read())
            self.record("machine", busy, used, now)
        except (OSError, ValueError, KeyError, IndexError):
            pass
        self.timestamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def process_groups() -> dict[int, tuple[int, int]]:
    """{process group: (CPU ticks, resident bytes)} summed over every process on the machine."""
    totals: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                pgid, ticks = parse_stat(f.read())
            with open(f"/proc/{entry}/statm") as f:
                memory = parse_statm(f.read())
        except (OSError, ValueError, IndexError):
            continue   # gone between the listing and the read
        before = totals.get(pgid, (0, 0))
        totals[pgid] = (before[0] + ticks, before[1] + memory)
    return totals


# ---- the API's side: metrics.k8s.io objects from the agents' reports ------------------------------

def node_metrics(node_name: str, report: dict) -> dict | None:
    machine = report.get("node")
    if not machine:
        return None
    return {"kind": "NodeMetrics", "apiVersion": "metrics.k8s.io/v1beta1",
            "metadata": {"name": node_name, "creationTimestamp": report.get("timestamp")},
            "timestamp": report.get("timestamp"), "window": f"{report.get('window', 0):.0f}s",
            "usage": machine}


def pod_metrics(report: dict) -> list[dict]:
    return [{"kind": "PodMetrics", "apiVersion": "metrics.k8s.io/v1beta1",
             "metadata": {"name": pod["name"], "namespace": pod["namespace"],
                          "creationTimestamp": report.get("timestamp")},
             "timestamp": report.get("timestamp"), "window": f"{report.get('window', 0):.0f}s",
             "containers": [{"name": c["name"], "usage": c["usage"]} for c in pod["containers"]]}
            for pod in report.get("pods") or [] if pod.get("containers")]
