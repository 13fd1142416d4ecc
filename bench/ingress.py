"""Ingress benchmark: netplane ingress against nginx, same routes, same backend, one worker each, one run.

    .venv/bin/python bench/ingress.py [--duration 8] [--connections 64] [--rounds 3] [--access-log]
                                      [--backend nginx|echo] [--scenario "1 route"|4x50]

Backend (the same one for both proxies): by default a separate nginx (1 worker) answering a fixed
200 with a small body, so the backend is never what limits the proxies; `--backend echo` uses
`netplane echo` (uvloop + httptools), which caps both proxies near its own speed. Both proxies keep
upstream connections alive (nginx: `keepalive 64`, HTTP/1.1, `Connection ""`) and set the same
forwarding headers. Scenarios: `1 route` (one Ingress, one host, one path) and `4x50` (4 Ingresses,
each its own host with 50 Prefix paths; requests hit a path in the middle of the set).
On a machine with 2+ cores both proxies are pinned to cpu0 and wrk + backend share the others.
`--calibrate` adds a third proxy to the `1 route` scenario: bench/passthrough.py, uvloop + httptools
passing responses through and nothing else (no routing, filtering or framing), the floor under any
Python proxy on these libraries; its row says how much of the gap to nginx is Python itself.
Rounds alternate which proxy goes first (drift from other load hits both alike); each line shows
the 1-minute load average before it. Summary: the median of the rounds for each figure, and the
ratios netplane/nginx of those medians. CPU per request = proxy utime+stime (/proc) / requests.
Needs wrk and nginx (Debian: wrk, nginx-light or nginx).
"""
from __future__ import annotations

import argparse
import os
import statistics
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

NETPLANE = [sys.executable, "-m", "netplane"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Figures:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_req: float
    errors: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{proc.args[0]} did not start listening on {port}") from None
            time.sleep(0.05)


def pinned(argv: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus and shutil.which("taskset") else argv


# ------------------------------------------------------------------------------ scenario inputs

def scenario(name: str, backend_port: int) -> tuple[list[dict], str, str]:
    """(objects, Host to request, path to request)."""
    hosts = {"1 route": [("bench.test", ["/"])],
             "4x50": [(f"site{h}.test", [f"/app{p}/v1" for p in range(50)]) for h in range(4)]}[name]
    objects = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "default"},
         "spec": {"ports": [{"name": "http", "port": 80, "targetPort": backend_port}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
         "metadata": {"name": "echo-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "echo"}},
         "ports": [{"name": "http", "port": backend_port}],
         "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]}]
    for i, (host, paths) in enumerate(hosts):
        objects.append({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                        "metadata": {"name": f"ing{i}", "namespace": "default"},
                        "spec": {"rules": [{"host": host, "http": {"paths": [
                            {"path": p, "pathType": "Prefix",
                             "backend": {"service": {"name": "echo", "port": {"number": 80}}}} for p in paths]}}]}})
    host, paths = hosts[len(hosts) // 2]
    return objects, host, paths[len(paths) // 2] + "/item"


def nginx_conf(workdir: Path, objects: list[dict], listen: int, backend_port: int, access_log: bool) -> Path:
    servers = []
    for ing in (o for o in objects if o["kind"] == "Ingress"):
        for r in ing["spec"]["rules"]:
            locations = "".join(
                f"    location {p['path']} {{ proxy_pass http://echo; }}\n" for p in r["http"]["paths"])
            servers.append(f"  server {{\n    listen 127.0.0.1:{listen};\n    server_name {r['host']};\n"
                           f"{locations}  }}\n")
    log = f"access_log {workdir}/nginx-access.log;" if access_log else "access_log off;"
    conf = f"""worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  {log}
  client_body_temp_path {workdir}/body; proxy_temp_path {workdir}/proxy;
  fastcgi_temp_path {workdir}/fcgi; uwsgi_temp_path {workdir}/uwsgi; scgi_temp_path {workdir}/scgi;
  keepalive_requests 100000;
  upstream echo {{ server 127.0.0.1:{backend_port}; keepalive 64; keepalive_requests 1000000; }}
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_set_header Host $http_host;
  proxy_set_header X-Forwarded-For $remote_addr;
  proxy_set_header X-Real-IP $remote_addr;
  proxy_set_header X-Forwarded-Proto $scheme;
  proxy_set_header X-Forwarded-Host $http_host;
  proxy_set_header X-Forwarded-Port $server_port;
  proxy_buffering off;
{''.join(servers)}}}
"""
    path = workdir / "nginx.conf"
    path.write_text(conf)
    return path



BACKEND_BODY = "hello from the bench backend\n"


def backend_nginx_conf(workdir: Path, port: int) -> Path:
    """A backend that is not the bottleneck: nginx answering a fixed small response."""
    root = workdir / "backend"
    root.mkdir(exist_ok=True)
    conf = f"""worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {root}/body; proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fcgi; uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{ default_type text/plain; return 200 "{BACKEND_BODY.rstrip()}\\n"; }}
  }}
}}
"""
    path = root / "nginx.conf"
    path.write_text(conf)
    return path

# ------------------------------------------------------------------------------ measuring

def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])   # utime, stime
    return total / CLK_TCK


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        pids += process_tree(int(child))
    return pids


def parse_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)   # wrk's units
    if match is None:
        raise ValueError(f"wrk printed a latency of {text!r}: did the proxy answer?")
    value, unit = match.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}[unit]


def run_wrk(port: int, host: str, path: str, duration: int, connections: int, cpus: str | None,
            pids: list[int]) -> Figures:
    argv = pinned(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-H", f"Host: {host}",
                   f"http://127.0.0.1:{port}{path}"], cpus)
    before = cpu_seconds(pids)
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    used = cpu_seconds(pids) - before
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    # the Latency Distribution lines, not a "+/- Stdev" column that happens to end in 50.00%
    p50 = parse_ms(re.search(r"^\s+50%\s+(\S+)$", out, re.M).group(1))
    p99 = parse_ms(re.search(r"^\s+99%\s+(\S+)$", out, re.M).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    n_errors = int(errors.group(1)) if errors else 0
    n_errors += sum(map(int, socket_errors.groups())) if socket_errors else 0
    return Figures(rps, p50, p99, used / max(total, 1) * 1e6, n_errors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", choices=("nginx", "echo"), default="nginx")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS,
                        help="run only this scenario (repeatable; default: all)")
    parser.add_argument("--access-log", action="store_true", help="both proxies log every request")
    parser.add_argument("--calibrate", action="store_true",
                        help="also measure bench/passthrough.py (the bare uvloop + httptools floor) in `1 route`")
    args = parser.parse_args(argv)
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            print(f"bench/ingress.py needs {tool} (Debian: apt-get install wrk nginx-light)", file=sys.stderr)
            return 2
    ncpu = os.cpu_count() or 1
    proxy_cpu, load_cpus = ("0", f"1-{ncpu - 1}") if ncpu >= 2 else (None, None)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="netplane-bench-ingress-") as tmp:
        workdir = Path(tmp)
        try:
            backend_port = free_port()
            backend = start_backend(args.backend, workdir, backend_port, load_cpus)
            procs.append(backend)
            wait_port(backend_port, backend)
            print(f"backend {args.backend} on cpus {load_cpus or 'any'}; proxies on cpu {proxy_cpu or 'any'}; "
                  f"wrk -t1 -c{args.connections} -d{args.duration}s on cpus {load_cpus or 'any'}; access log "
                  f"{'on' if args.access_log else 'off'} for both")
            print(f"{'scenario':<9} {'proxy':<9} {'round':>5} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
                  f"{'CPU us/req':>10} {'errors':>6} {'load1':>6}")
            for name in args.scenario or SCENARIOS:
                objects, host, path = scenario(name, backend_port)
                results = measure_scenario(name, objects, host, path, workdir, backend_port, args,
                                           proxy_cpu, load_cpus, procs)
                report_summary(name, results)
            if args.calibrate:
                cost = python_cost()
                print(f"Python per request, no I/O (best of 5 x 100,000): netplane {cost['netplane']:.1f} us, "
                      f"passthru {cost['passthru']:.1f} us", flush=True)
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    return 0


SCENARIOS = ("1 route", "4x50")

# ------------------------------------------------------------------------------ Python alone

_REQUEST = b"GET /item HTTP/1.1\r\nHost: bench.test\r\n\r\n"
_RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 16:00:00 GMT\r\n"
             b"Content-Type: text/plain\r\nContent-Length: 29\r\nConnection: keep-alive\r\n\r\n"
             b"hello from the bench backend\n")


class _Transport:
    """Takes writes and does nothing: the protocols run without any I/O."""

    def __init__(self):
        self.written = []

    def write(self, data):
        self.written.append(data)

    def get_extra_info(self, key):
        return ("127.0.0.1", 40000)

    def is_closing(self):
        return False

    def pause_reading(self):
        pass

    resume_reading = pause_reading


def _per_request_us(one, transports, rounds: int = 5, count: int = 100_000) -> float:
    """Best of `rounds` runs of `count` calls of one(), in microseconds per call."""
    for _ in range(1000):
        one()
    if not all(t.written for t in transports):
        raise RuntimeError("the protocols wrote nothing: the calibration request did not go through")
    best = float("inf")
    for _ in range(rounds):
        for t in transports:
            t.written.clear()
        start = time.perf_counter()
        for _ in range(count):
            one()
        best = min(best, (time.perf_counter() - start) / count)
    return best * 1e6


def python_cost() -> dict:
    """Microseconds of Python per proxied request, with no I/O: netplane ingress's ClientConnection
    and UpstreamConnection, and the pass-through's, each fed one request and one response per call."""
    import asyncio
    import passthrough
    from netplane.ingress import proxy, routes
    import uvloop
    asyncio.set_event_loop(uvloop.new_event_loop())   # as the worker runs: uvloop's loop.time() is C
    objects, host, _ = scenario("1 route", 9)
    ours = proxy.Proxy(routes.build_table(routes.Objects.from_list(objects)), proxy.Settings(access_log=False))
    client, client_t = proxy.ClientConnection(ours), _Transport()
    client.connection_made(client_t)
    upstream, upstream_t = proxy.UpstreamConnection(ours, ours.table.route(host, "/").backend.endpoints[0]), _Transport()
    upstream.connection_made(upstream_t)
    ours.give_back(upstream)
    request = _REQUEST.replace(b"bench.test", host.encode())

    def netplane_one():
        client.data_received(request)
        upstream.data_received(_RESPONSE)

    pool = []
    bare, bare_t = passthrough.Client(pool, ("127.0.0.1", 9)), _Transport()
    bare.connection_made(bare_t)
    bare_up, bare_up_t = passthrough.Upstream(pool), _Transport()
    bare_up.connection_made(bare_up_t)
    pool.append(bare_up)

    def passthrough_one():
        bare.data_received(request)
        bare_up.data_received(_RESPONSE)

    return {"netplane": _per_request_us(netplane_one, [client_t, upstream_t]),
            "passthru": _per_request_us(passthrough_one, [bare_t, bare_up_t])}


def start_backend(kind: str, workdir: Path, port: int, cpus: str | None) -> subprocess.Popen:
    if kind == "nginx":
        argv = ["nginx", "-c", str(backend_nginx_conf(workdir, port))]
        return subprocess.Popen(pinned(argv, cpus))
    return subprocess.Popen(pinned([*NETPLANE, "echo", "--quiet", "--port", str(port)], cpus),
                            env={**os.environ, "POD_NAME": "bench-echo"}, stdout=subprocess.DEVNULL)


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def measure_scenario(name, objects, host, path, workdir, backend_port, args, proxy_cpu, load_cpus, procs):
    calibrate = args.calibrate and name == "1 route"
    results: dict[str, list[Figures]] = {"netplane": [], "nginx": [], **({"passthru": []} if calibrate else {})}
    objects_file = workdir / "objects.yaml"
    objects_file.write_text(yaml.safe_dump_all(objects))
    ports = {proxy: free_port() for proxy in results}
    ingress_argv = [*NETPLANE, "ingress", "serve", "--objects", str(objects_file),
                    "--listen", f"127.0.0.1:{ports['netplane']}", "--workers", "1"]
    if not args.access_log:
        ingress_argv.append("--no-access-log")
    log = open(workdir / "ingress.log", "w")
    servers = {
        "netplane": subprocess.Popen(pinned(ingress_argv, proxy_cpu), stdout=log, stderr=log),
        "nginx": subprocess.Popen(pinned(["nginx", "-c", str(nginx_conf(workdir, objects, ports["nginx"],
                                                                         backend_port, args.access_log))],
                                         proxy_cpu)),
    }
    if calibrate:
        passthrough = [sys.executable, str(Path(__file__).with_name("passthrough.py")), str(ports["passthru"]),
                       str(backend_port)]
        servers["passthru"] = subprocess.Popen(pinned(passthrough, proxy_cpu))
    procs += servers.values()
    try:
        for proxy, proc in servers.items():
            wait_port(ports[proxy], proc)
            check = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Host: {host}",
                                    f"http://127.0.0.1:{ports[proxy]}{path}"], capture_output=True, text=True)
            if check.stdout != "200":
                raise RuntimeError(f"{proxy} answered {check.stdout} for {host}{path}")
        for proxy, proc in servers.items():   # warm up: pools filled, code paths hot
            run_wrk(ports[proxy], host, path, 1, args.connections, load_cpus, process_tree(proc.pid))
        for round_ in range(1, args.rounds + 1):
            order = list(servers) if round_ % 2 else list(reversed(servers))
            for proxy in order:
                load = load1()
                pids = process_tree(servers[proxy].pid)
                fig = run_wrk(ports[proxy], host, path, args.duration, args.connections, load_cpus, pids)
                results[proxy].append(fig)
                print(f"{name:<9} {proxy:<9} {round_:>5} {fig.rps:>9.0f} {fig.p50_ms:>7.2f} {fig.p99_ms:>7.2f} "
                      f"{fig.cpu_us_per_req:>10.1f} {fig.errors:>6} {load:>6.2f}", flush=True)
    finally:
        for proc in servers.values():
            proc.terminate()
            proc.wait(10)
    return results


def report_summary(name: str, results: dict[str, list[Figures]]) -> None:
    """Medians over the rounds (one noisy round does not decide), then the ratios of the medians."""
    med = {proxy: Figures(*(statistics.median(getattr(f, field) for f in figs)
                            for field in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "errors")))
           for proxy, figs in results.items()}
    for proxy, fig in med.items():
        print(f"{name:<9} {proxy:<9} {'median':>5} {fig.rps:>9.0f} {fig.p50_ms:>7.2f} {fig.p99_ms:>7.2f} "
              f"{fig.cpu_us_per_req:>10.1f} {fig.errors:>6.0f}")
    theirs = med["nginx"]
    for proxy in (p for p in med if p != "nginx"):
        ours = med[proxy]
        print(f"{name:<9} ratio {proxy}/nginx (medians): req/s {ours.rps / theirs.rps:.2f}x, "
              f"p50 {ours.p50_ms / theirs.p50_ms:.2f}x, p99 {ours.p99_ms / theirs.p99_ms:.2f}x, "
              f"CPU/req {ours.cpu_us_per_req / theirs.cpu_us_per_req:.2f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
