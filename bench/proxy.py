"""Service proxy at scale, in one run: full syncs, a one-Service change, connection rates, memory.

    python bench/proxy.py [--services 1000,10000] [--endpoints 10] [--seconds 3] [--skip-iptables]

Everything happens in scratch namespaces named np-bench-..., removed at the end even on failure:
- full sync: `netplane proxy sync --once --objects FILE` (the whole command: reading the YAML,
  rendering, applying) in a fresh namespace, for N Services x M endpoints, per backend (nftables;
  iptables-legacy and iptables-nft when their restore commands exist);
- one change at the largest N: the proxy daemon's own sync (Proxier.sync: the watch's change
  trackers hand it the changed object, it converts and renders only that Service, applies the
  delta, cleans conntrack when UDP changed, updates health checks) run inside the namespace
  after a full sync, for an EndpointSlice change and a Service change;
- TCP connection rate: client namespace -> node namespace (the rules) -> endpoint namespace, a
  small C server that accepts and closes, a C client that connects (the handshake through the
  DNAT) and resets, so no TIME_WAIT is left to collide with later connections, for --seconds
  each; through a ClusterIP and straight to the pod IP, with 10 and with N Services
  programmed (nftables; the measured Service is the first one, others point at absent pods);
- peak memory (max RSS) of the proxy process, and of its nft child, for the largest full sync.
Prints a table. Needs root, nft, gcc (for the rate test).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
NODE_NAME = "bench-node"
# The client is a pod on another bridge of the node (in the cluster CIDR, so not masqueraded:
# with masquerading, random source ports collide with the server's TIME_WAIT sockets and the
# rate measures that instead of the rules).
CLIENT_IP, NODE_CLIENT_SIDE = "10.244.2.2", "10.244.2.1"
GATEWAY, POD_IP = "10.244.1.1", "10.244.1.10"

SERVER_C = r"""
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
/* accepts and closes; the client resets each connection once it is established */
int main(int argc, char **argv) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4096)) return 1;
    write(1, "ready\n", 6);
    for (;;) { int c = accept(s, 0, 0); if (c >= 0) close(c); }
}
"""
CLIENT_C = r"""
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &a.sin_addr);
    double seconds = atof(argv[3]), start = now(); long ok = 0, failed = 0;
    struct linger reset = {1, 0};  /* close with RST: no TIME_WAIT to collide with later tuples */
    while (now() - start < seconds) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(s, (struct sockaddr *)&a, sizeof a) == 0) ok++; else failed++;
        setsockopt(s, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
        close(s);
    }
    printf("%ld %ld %f\n", ok, failed, now() - start);
    return 0;
}
"""


# --- objects ---------------------------------------------------------------------------------

def endpoint_ip(k: int) -> str:
    return f"10.{100 + k // 65536}.{k // 256 % 256}.{k % 256}"


def objects_yaml(services: int, endpoints: int, first_endpoint: str | None = None) -> str:
    """N ClusterIP Services with M endpoints each (on other nodes), as multi-document YAML in
    the shape kubectl writes. With first_endpoint, Service 0 has that one endpoint instead."""
    docs = []
    for i in range(services):
        if i == 0 and first_endpoint:
            ips = [first_endpoint]
        else:
            ips = [endpoint_ip(i * endpoints + j) for j in range(endpoints)]
        eps = "".join(f"\n- addresses: [{ip}]\n  nodeName: node-{j % 100}\n  conditions: {{ready: true}}"
                      for j, ip in enumerate(ips))
        docs.append(f"""apiVersion: v1
kind: Service
metadata:
  name: svc-{i}
  namespace: bench
spec:
  type: ClusterIP
  clusterIP: 10.96.{(i + 1) // 256}.{(i + 1) % 256}
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc-{i}-abcde
  namespace: bench
  labels:
    kubernetes.io/service-name: svc-{i}
addressType: IPv4
endpoints:{eps}
ports:
- name: http
  port: 8080
  protocol: TCP
""")
    return "---\n".join(docs)


# --- namespaces ------------------------------------------------------------------------------

class Namespaces:
    """np-bench-* namespaces, all removed by close() (processes in them killed first)."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def make(self, role: str) -> str:
        name = f"np-bench-{role}-{uuid.uuid4().hex[:6]}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.made.append(name)
        run(name, "ip", "link", "set", "lo", "up")
        return name

    def remove(self, name: str) -> None:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            subprocess.run(["kill", "-9", pid], capture_output=True)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        self.made.remove(name)

    def close(self) -> None:
        for name in reversed(self.made):
            self.remove(name)


def run(ns: str | None, *argv: str, timeout: float = 900, stdin: str | None = None) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=stdin)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")
    return proc


# --- measurements ----------------------------------------------------------------------------

PROXY_SYNC = [PYTHON, "-m", "netplane", "proxy", "sync", "--once", "--node-name", NODE_NAME,
              "--node-ip", NODE_CLIENT_SIDE, "--cluster-cidr", "10.244.0.0/16"]

MEASURED_SYNC = r"""
import json, resource, sys, time
from netplane.proxy import cli
rc = cli.main(sys.argv[1:])
print(json.dumps({"rc": rc, "self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def full_sync(spaces: Namespaces, path: str, backend: str, limit: float) -> dict | None:
    """Wall time of the whole `netplane proxy sync --once` in a fresh namespace, and its memory;
    None when it did not finish within `limit` seconds (then it is killed)."""
    ns = spaces.make("sync")
    try:
        start = time.perf_counter()
        try:
            proc = run(ns, PYTHON, "-c", MEASURED_SYNC, *PROXY_SYNC[4:], "--objects", path,
                       "--backend", backend, timeout=limit)
        except subprocess.TimeoutExpired:
            return None
        elapsed = time.perf_counter() - start
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["seconds"] = elapsed
        return result
    finally:
        spaces.remove(ns)  # kills what is left (a restore command past the limit)


ONE_CHANGE = r"""
import asyncio, copy, json, statistics, sys, time
from prometheus_client import REGISTRY
from netplane.client import ChangeTracker
from netplane.objects import key_of
from netplane.proxy import cli
from netplane.proxy.apply import backend_for
from netplane.proxy.model import NodeFacts
from netplane.proxy.proxier import HealthCheckServers, Proxier
path, backend_name, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])


class Cache:
    # What the proxier's informers hold: the objects by kind, and change trackers that the
    # watch records into as events arrive (netplane.client.Informer does the same).
    def __init__(self, objs):
        self.objects = {"Service": {}, "EndpointSlice": {}}
        for o in objs:
            self.objects[o["kind"]][key_of(o)] = o
        self.trackers = {kind: [] for kind in self.objects}

    def list(self, kind):
        return list(self.objects[kind].values())

    def tracker(self, kind):
        tracker = ChangeTracker(self.objects[kind])
        self.trackers[kind].append(tracker)
        return tracker

    def is_synced(self):
        return True

    def event(self, obj):  # a MODIFIED event: a new object for the new version
        self.objects[obj["kind"]][key_of(obj)] = obj
        for tracker in self.trackers[obj["kind"]]:
            tracker.record(key_of(obj), obj)


async def main():
    cache = Cache(cli.load_objects(path))
    node = NodeFacts("bench-node", node_ips=("10.244.2.1",), cluster_cidrs=("10.244.0.0/16",))
    proxier = Proxier(cache, node, backend_for(backend_name), health_servers=HealthCheckServers(("127.0.0.1",)))
    await proxier.sync()  # the first, full sync (it freezes the long-lived objects for the gc)
    services, slices = cache.list("Service"), cache.list("EndpointSlice")
    timings = {"endpoints": [], "service": []}
    for r in range(rounds):
        i = 1 + (r * 997) % (len(slices) - 1)
        changed = copy.deepcopy(slices[i])
        changed["endpoints"][0]["addresses"] = [f"10.200.{r // 256}.{r % 256}"]
        cache.event(changed)
        start = time.perf_counter()
        await proxier.sync()
        timings["endpoints"].append(time.perf_counter() - start)
        svc = copy.deepcopy(services[i])
        svc["spec"]["ports"][0]["port"] = 81 + r
        cache.event(svc)
        start = time.perf_counter()
        await proxier.sync()
        timings["service"].append(time.perf_counter() - start)
    await proxier.health_servers.close()
    full = REGISTRY.get_sample_value("netplane_proxy_sync_duration_seconds_count", {"kind": "full"})
    assert full == 1, f"{full} full syncs: the changes were not applied as partial ones"
    print(json.dumps({k: [statistics.median(v), max(v)] for k, v in timings.items()}))

asyncio.run(main())
"""


def one_change(spaces: Namespaces, path: str, backend: str, rounds: int) -> dict:
    ns = spaces.make("change")
    try:
        proc = run(ns, PYTHON, "-c", ONE_CHANGE, path, backend, str(rounds))
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        spaces.remove(ns)


class RateTopology:
    """client --veth-- node (rules) --veth-- endpoint, with the C server on the endpoint."""

    def __init__(self, spaces: Namespaces, build_dir: str) -> None:
        self.client, self.node, self.pod = (spaces.make(r) for r in ("client", "node", "pod"))
        server, self.client_bin = (os.path.join(build_dir, n) for n in ("server", "client"))
        for name, source in ((server, SERVER_C), (self.client_bin, CLIENT_C)):
            with open(f"{name}.c", "w") as out:
                out.write(source)
            run(None, "cc", "-O2", "-o", name, f"{name}.c")
        run(self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        run(self.client, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000")
        self._wire("vc", self.client, f"{NODE_CLIENT_SIDE}/24", f"{CLIENT_IP}/24", NODE_CLIENT_SIDE)
        self._wire("vp", self.pod, f"{GATEWAY}/24", f"{POD_IP}/24", GATEWAY)
        self.server = subprocess.Popen(["ip", "netns", "exec", self.pod, server, "8080"],
                                       stdout=subprocess.PIPE, text=True)
        assert self.server.stdout.readline().strip() == "ready"

    def _wire(self, link: str, peer_ns: str, node_cidr: str, peer_cidr: str, via: str) -> None:
        run(self.node, "ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", peer_ns)
        run(self.node, "ip", "addr", "add", node_cidr, "dev", link)
        run(self.node, "ip", "link", "set", link, "up")
        run(peer_ns, "ip", "addr", "add", peer_cidr, "dev", "eth0")
        run(peer_ns, "ip", "link", "set", "eth0", "up")
        run(peer_ns, "ip", "route", "add", "default", "via", via)

    def program(self, path: str) -> None:
        run(self.node, *PROXY_SYNC, "--objects", path)

    def rate(self, ip: str, port: int, seconds: float) -> float:
        run(self.node, "conntrack", "-F")
        ok, failed, elapsed = run(self.client, self.client_bin, ip, str(port), str(seconds),
                                  timeout=seconds + 60).stdout.split()
        if int(failed) > int(ok) // 100:
            raise RuntimeError(f"{failed} of {int(ok) + int(failed)} connections to {ip}:{port} failed")
        return int(ok) / float(elapsed)

    def close(self) -> None:
        self.server.kill()
        self.server.wait()


def connection_rates(spaces: Namespaces, tmp: str, sizes: list[int], endpoints: int, seconds: float) -> dict:
    topo = RateTopology(spaces, tmp)
    try:
        rates: dict = {}
        for rounds in range(2):  # alternate sizes twice; keep each one's best run
            for n in sizes:
                path = os.path.join(tmp, f"rate-{n}.yaml")
                if not os.path.exists(path):
                    with open(path, "w") as out:
                        out.write(objects_yaml(n, endpoints, first_endpoint=POD_IP))
                topo.program(path)
                for label, ip, port in (("clusterip", "10.96.0.1", 80), ("pod", POD_IP, 8080)):
                    key = (n, label)
                    rates[key] = max(rates.get(key, 0.0), topo.rate(ip, port, seconds))
        return rates
    finally:
        topo.close()


# --- main ------------------------------------------------------------------------------------

CALIBRATION = "import time\nt = time.perf_counter()\nx = 0\nfor i in range(10_000_000):\n    x += i\nprint(time.perf_counter() - t)"


def cpu_calibration() -> float:
    """Seconds for a plain Python loop (10M additions) in the proxy's interpreter: this VM's
    speed varies run to run (0.45 s to 0.85 s seen), and the absolute targets move with it."""
    return min(float(run(None, PYTHON, "-c", CALIBRATION).stdout) for _ in range(3))


def iptables_variants() -> list[str]:
    return [v for v in ("iptables-legacy", "iptables-nft") if shutil.which(f"{v}-restore")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", default="1000,10000")
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--skip-iptables", action="store_true")
    parser.add_argument("--limit", type=float, default=120.0, metavar="SECONDS",
                        help="give up on a full sync after this long (iptables-nft-restore at 10k)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/proxy.py needs root (network namespaces)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.services.split(",")]
    largest = max(sizes)
    backends = ["nftables"] + ([] if args.skip_iptables else iptables_variants())
    os.environ["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    spaces = Namespaces()
    tmp = tempfile.mkdtemp(prefix="np-bench-proxy-")
    rows: list[tuple[str, str]] = []
    calibration = cpu_calibration()
    try:
        paths = {}
        for n in sizes:
            paths[n] = os.path.join(tmp, f"objects-{n}.yaml")
            with open(paths[n], "w") as out:
                out.write(objects_yaml(n, args.endpoints))
        memory, finished = None, []
        for backend in backends:
            for n in sizes:
                # nftables three times (median, and the spread: this VM's speed varies)
                results = [full_sync(spaces, paths[n], backend, args.limit)
                           for _ in range(3 if backend == "nftables" else 1)]
                result = None if None in results else sorted(results, key=lambda r: r["seconds"])[len(results) // 2]
                text = f"{result['seconds']:.2f} s" if result else f"> {args.limit:.0f} s (stopped)"
                if result and len(results) > 1:
                    spread = ", ".join(f"{r['seconds']:.2f}" for r in results)
                    text += f" (of {spread})"
                rows.append((f"full sync, {n} x {args.endpoints}, {backend}", text))
                if result and n == largest:
                    finished.append(backend)
                    memory = memory or result  # nftables first
                print(f"  {rows[-1][0]}: {rows[-1][1]}", file=sys.stderr, flush=True)
        for backend in finished:
            change = one_change(spaces, paths[largest], backend, rounds=9 if backend == "nftables" else 3)
            for what, label in (("endpoints", "an EndpointSlice"), ("service", "a Service")):
                median, worst = change[what]
                rows.append((f"one change ({label}) at {largest}, {backend}",
                             f"{median * 1000:.1f} ms (max {worst * 1000:.1f} ms)"))
                print(f"  {rows[-1][0]}: {rows[-1][1]}", file=sys.stderr, flush=True)
        if shutil.which("cc"):
            rate_sizes = [10, largest]
            rates = connection_rates(spaces, tmp, rate_sizes, args.endpoints, args.seconds)
            for n in rate_sizes:
                for label, text in (("clusterip", "through the ClusterIP"), ("pod", "straight to the pod IP")):
                    rows.append((f"TCP connections/s, {text}, {n} Services (nftables)", f"{rates[(n, label)]:.0f}"))
            ratio = rates[(largest, "clusterip")] / rates[(10, "clusterip")]
            rows.append((f"ClusterIP rate at {largest} / at 10 Services", f"{ratio:.2f} (target >= 0.9)"))
            for n in rate_sizes:
                rows.append((f"ClusterIP / pod IP rate at {n} Services",
                             f"{rates[(n, 'clusterip')] / rates[(n, 'pod')]:.2f}"))
        else:
            rows.append(("TCP connection rate", "skipped: no C compiler (cc)"))
        if memory and "nftables" in finished:
            rows.append((f"peak RSS of the proxy process, full sync {largest} x {args.endpoints}",
                         f"{memory['self_kib'] / 1024:.0f} MiB (target < 300)"))
            rows.append(("peak RSS of its largest child process (nft, or a forked half: shared pages count in both)", f"{memory['children_kib'] / 1024:.0f} MiB"))
    finally:
        spaces.close()
        shutil.rmtree(tmp, ignore_errors=True)
    rows.append(("CPU calibration: a 10M-step Python loop, before / after", f"{calibration:.2f} s / {cpu_calibration():.2f} s"))
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
    width = max(len(r[0]) for r in rows)
    print(f"\nservice proxy bench ({nft}, kernel {os.uname().release}, {os.cpu_count()} CPUs)")
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
