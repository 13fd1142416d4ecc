"""How long `netplane lab up` takes to a Ready cluster, and `lab down` to nothing; p50 over N runs.

    python bench/lab.py [--runs 5] [--nodes 3] [--pod-network routes|vxlan] [--proxy nftables|iptables]
                        [--store sqlite|etcd]

Each run: `netplane lab up` (it returns once every node is Ready, the system pods are Ready and the
ingress answers the host on its LoadBalancer address), then `netplane lab down`, both timed from
outside as wall time. Target: p50 of `up` under 10 s for 3 nodes. Needs root and no lab up.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time

TARGET_SECONDS = 10.0


def netplane(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "netplane", *args], capture_output=True, text=True)
    return time.perf_counter() - started, proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--pod-network", default="routes", choices=("routes", "vxlan"))
    parser.add_argument("--proxy", default="nftables", choices=("nftables", "iptables"))
    parser.add_argument("--store", default="sqlite", choices=("sqlite", "etcd"))
    args = parser.parse_args()
    flags = ["--nodes", str(args.nodes), "--pod-network", args.pod_network, "--proxy", args.proxy,
             "--store", args.store]
    _, status = netplane("lab", "status")
    if status.returncode == 0:
        print("a lab is up: `netplane lab down` first", file=sys.stderr)
        return 1
    ups, downs, inside = [], [], []
    for run in range(1, args.runs + 1):
        up_time, up = netplane("lab", "up", *flags)
        down_time, down = netplane("lab", "down")
        if up.returncode != 0 or down.returncode != 0:
            print(f"run {run}: lab up/down failed:\n{up.stdout}{up.stderr}{down.stdout}{down.stderr}", file=sys.stderr)
            return 1
        reported = re.search(r"lab is up in ([0-9.]+)s", up.stdout)
        inside.append(float(reported.group(1)) if reported else float("nan"))
        ups.append(up_time)
        downs.append(down_time)
        print(f"run {run}: up {up_time:5.2f}s (reported {inside[-1]:.2f}s)   down {down_time:5.2f}s", flush=True)
    p50 = statistics.median(ups)
    print(f"\nlab up, {args.nodes} nodes ({args.pod_network}, {args.proxy}, {args.store}), {args.runs} runs: "
          f"p50 {p50:.2f}s  min {min(ups):.2f}s  max {max(ups):.2f}s   "
          f"(target < {TARGET_SECONDS:.0f}s: {'met' if p50 < TARGET_SECONDS else 'MISSED'})")
    print(f"lab down: p50 {statistics.median(downs):.2f}s  max {max(downs):.2f}s")
    return 0 if p50 < TARGET_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
