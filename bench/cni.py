"""CNI ADD/DEL latency: netplane-cni against the reference bridge + host-local plugins, in one run.

    python bench/cni.py [--pods 50] [--cycles 0] [--reference-dir /usr/lib/cni]

Makes a throwaway node namespace (np-bench-...) and pod namespaces, re-enters itself inside the node
(as a runtime on that node would exec plugins), and times each exec of ADD and DEL for --pods pods,
once per plugin: netplane-cni through its launcher (`python -m netplane.cni.install`) with the node's
resident helper running (as under the node agent) and without one (standalone), netplane-cni through
pip's console script, and the reference pair (Debian's containernetworking-plugins). Prints p50/p95
and the ratios to the reference.

--calibrate adds three rows that say where the floor is. "floor: bare interpreter": a script with the
launcher's shebang that only exits (the cost of an exec of the real interpreter, which the issue's
installation rule fixes). "floor: minimal CPython ADD": the launcher forwarding to bench/cni_floor.py,
straight-line Python that does only an ADD's kernel and disk work (DEL declined: run standalone).
"compiled forwarder + node helper": bench/cni_forward.c (built with cc, if there is one) in place
of the launcher, with the real helper: what a compiled launcher would give. --cycles N also runs N ADD/DEL cycles of netplane-cni (with
ipMasq) and checks that no allocation, link or nft table is left. Everything is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBNET = "10.250.0.0/16"
CANDIDATES = 4   # launcher with the node helper, launcher standalone, console script, reference
CALIBRATIONS = 3   # with --calibrate: bare interpreter, minimal CPython ADD, compiled forwarder


def network_config(name: str, plugin_type: str, ipam_type: str, bridge: str, data_dir: str, **extra) -> dict:
    return {"cniVersion": "1.0.0", "name": name, "type": plugin_type, "bridge": bridge, "isGateway": True,
            "isDefaultGateway": True, "ipMasq": False, "hairpinMode": True, "mtu": 1500,
            "ipam": {"type": ipam_type, "ranges": [[{"subnet": SUBNET}]], "dataDir": data_dir}, **extra}


def call(plugin: str, command: str, conf: dict, container_id: str, netns_path: str, cni_path: str,
         ifname: str = "eth0", extra_env: dict | None = None) -> float:
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": command,
           "CNI_CONTAINERID": container_id, "CNI_NETNS": netns_path, "CNI_IFNAME": ifname, "CNI_PATH": cni_path,
           **(extra_env or {})}
    start = time.perf_counter()
    proc = subprocess.run([plugin], input=json.dumps(conf), env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{plugin} {command} {container_id} failed: {proc.stdout.strip()} {proc.stderr.strip()}")
    return elapsed


def percentile(values: list, fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def measure(candidates: list, pods: list) -> list:
    """ADD then DEL of every pod, the candidates interleaved pod by pod so that each sees the same load
    on the machine. candidates: (label, plugin path, config, CNI_PATH, extra environment); each has its
    own bridge, subnet and pod namespaces (pods[k] for candidate k)."""
    tag = uuid.uuid4().hex[:6]
    rows = [{"label": label, "add": [], "del": []} for label, *_ in candidates]
    for command in ("ADD", "DEL"):
        for i in range(len(pods[0])):
            for k, (row, (_, plugin, conf, cni_path, extra_env)) in enumerate(zip(rows, candidates)):
                row[command.lower()].append(call(plugin, command, conf, f"{tag}-{k}-{i}", f"/run/netns/{pods[k][i]}",
                                                 cni_path, extra_env=extra_env))
    return rows


def cycles(plugin: str, conf: dict, pod: str, count: int, extra_env: dict) -> str:
    for i in range(count):
        call(plugin, "ADD", conf, f"cycle-{i}", f"/run/netns/{pod}", "", extra_env=extra_env)
        call(plugin, "DEL", conf, f"cycle-{i}", f"/run/netns/{pod}", "", extra_env=extra_env)
    links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True).stdout)
    leftover_links = sorted(e["ifname"] for e in links if e["ifname"].startswith("np-"))
    directory = os.path.join(conf["ipam"]["dataDir"], conf["name"])
    leftover_ips = [n for n in os.listdir(directory) if n[0].isdigit()]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    ok = not leftover_links and not leftover_ips and "netplane-cni" not in tables
    return (f"{count} ADD/DEL cycles (ipMasq on): leftover links {leftover_links}, allocations {leftover_ips}, "
            f"nft table {'present' if 'netplane-cni' in tables else 'absent'} -> {'CLEAN' if ok else 'LEAK'}")


def report(rows: list) -> None:
    reference = rows[-1]
    print(f"{'plugin':<38}{'ADD p50':>9}{'ADD p95':>9}{'DEL p50':>9}{'DEL p95':>9}{'ADD x':>8}{'DEL x':>8}")
    for row in rows:
        add50, del50 = percentile(row["add"], 0.5), percentile(row["del"], 0.5)
        ratio_add = add50 / percentile(reference["add"], 0.5)
        ratio_del = del50 / percentile(reference["del"], 0.5)
        print(f"{row['label']:<38}{add50 * 1000:>7.1f}ms{percentile(row['add'], 0.95) * 1000:>7.1f}ms"
              f"{del50 * 1000:>7.1f}ms{percentile(row['del'], 0.95) * 1000:>7.1f}ms{ratio_add:>7.2f}x{ratio_del:>7.2f}x")


def calibration_candidates(work: str, ours: dict, another, with_helper: dict) -> tuple:
    """(the floor helper's process, the --calibrate candidates); see the module's docstring."""
    from netplane.cni import forward
    bare = os.path.join(work, "bin", "bare-interpreter")
    with open(os.path.join(work, "bin", "netplane-cni")) as launcher, open(bare, "w") as f:
        f.write(launcher.readline() + "import posix\nposix._exit(0)\n")   # the launcher's own shebang
    os.chmod(bare, 0o755)
    floor_conf = another("np-bench-floor", "cni5", "10.249.0.0/16")
    floor_name = f"np-bench-floor-{os.getpid()}"
    floor = subprocess.Popen([sys.executable, os.path.join(REPO, "bench", "cni_floor.py"), floor_name, json.dumps(floor_conf)],
                             stdout=subprocess.PIPE, text=True)
    if floor.stdout.readline().strip() != "listening":
        raise SystemExit("bench/cni_floor.py did not start")
    launcher_path = os.path.join(work, "bin", "netplane-cni")
    candidates = [("floor: bare interpreter", bare, another("np-bench4", "cni4", "10.248.0.0/16"), "", {}),
                  ("floor: minimal CPython ADD", launcher_path, floor_conf, "", {forward.HELPER_ENV: floor_name})]
    compiled = os.path.join(work, "bin", "forward-compiled")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc and subprocess.run([cc, "-O2", "-o", compiled, os.path.join(REPO, "bench", "cni_forward.c")]).returncode == 0:
        candidates.append(("compiled forwarder + node helper", compiled, another("np-bench6", "cni6", "10.247.0.0/16"), "",
                           with_helper))
    else:
        print("no C compiler: the compiled-forwarder row is left out")
    return floor, candidates


def inside(args) -> None:
    """Runs in the node namespace."""
    from netplane.cni import forward, helper
    work = args.work
    names = args.pod_names.split(",")
    pods = [names[k * args.pods:(k + 1) * args.pods] for k in range(len(names) // args.pods)]
    launcher = os.path.join(work, "bin", "netplane-cni")
    console = os.path.join(os.path.dirname(sys.executable), "netplane-cni")
    ours = network_config("np-bench", "netplane-cni", "netplane", "cni0", os.path.join(work, "ipam"))
    reference = network_config("np-bench-ref", "bridge", "host-local", "cni1", os.path.join(work, "ipam-ref"))
    reference["ipam"]["ranges"] = [[{"subnet": "10.252.0.0/16"}]]

    def another(name: str, bridge: str, subnet: str) -> dict:
        return {**ours, "name": name, "bridge": bridge, "ipam": {**ours["ipam"], "ranges": [[{"subnet": subnet}]]}}

    helper_name = f"np-bench-{os.getpid()}"
    with_helper = {forward.HELPER_ENV: helper_name}
    standalone = {forward.HELPER_ENV: ""}
    candidates = [("netplane-cni (launcher, node helper)", launcher, ours, "", with_helper),
                  ("netplane-cni (launcher, standalone)", launcher, another("np-bench3", "cni3", "10.253.0.0/16"), "",
                   standalone),
                  ("netplane-cni (pip console script)", console, another("np-bench2", "cni2", "10.251.0.0/16"), "",
                   standalone)]
    reference_bridge = os.path.join(args.reference_dir, "bridge")
    helper_process = helper.start(helper_name)   # as the node agent runs it
    floor_process = None
    try:
        if args.calibrate:
            floor_process, calibrations = calibration_candidates(work, ours, another, with_helper)
            candidates += calibrations
        if os.access(reference_bridge, os.X_OK):
            candidates.append(("reference bridge + host-local", reference_bridge, reference, args.reference_dir, {}))
            report(measure(candidates, pods))
        else:
            print(f"no reference plugins in {args.reference_dir} (apt-get install containernetworking-plugins)")
        if args.cycles:
            print(cycles(launcher, {**ours, "ipMasq": True}, pods[0][0], args.cycles, with_helper))
    finally:
        for process in (helper_process, floor_process):
            if process is not None:
                process.terminate()
                process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=50)
    parser.add_argument("--cycles", type=int, default=0)
    parser.add_argument("--reference-dir", default="/usr/lib/cni")
    parser.add_argument("--calibrate", action="store_true",
                        help="also measure the floors: bare interpreter, minimal CPython ADD, compiled forwarder")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--pod-names", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, REPO)
    if args.inside:
        inside(args)
        return 0
    from netplane.cni import install
    tag = uuid.uuid4().hex[:5]
    node = f"np-bench-{tag}"
    candidates = CANDIDATES + (CALIBRATIONS if args.calibrate else 0)
    pods = [f"np-bp{tag}-{k}-{i}" for k in range(candidates) for i in range(args.pods)]
    work = tempfile.mkdtemp(prefix="netplane-cni-bench-")
    made = []
    try:
        for name in [node, *pods]:
            subprocess.run(["ip", "netns", "add", name], check=True)
            made.append(name)
        install.install(os.path.join(work, "bin"))
        argv = [sys.executable, os.path.abspath(__file__), "--inside", "--work", work, "--pods", str(args.pods),
                "--pod-names", ",".join(pods), "--cycles", str(args.cycles), "--reference-dir", args.reference_dir,
                *(["--calibrate"] if args.calibrate else [])]
        return subprocess.run(["ip", "netns", "exec", node, *argv]).returncode
    finally:
        for name in reversed(made):
            subprocess.run(["ip", "netns", "delete", name], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
