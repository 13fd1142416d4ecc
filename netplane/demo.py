"""`make demo`: apply examples/ to a running lab and show each hop working, with what came back.

The probes here (a command in a pod, an HTTP GET from the host, waiting for a Deployment) are
also what the e2e tests use, so the demo shows exactly what the tests check.
"""
from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from netplane import lab
from netplane.client import Client

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROBE_POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "client", "namespace": "default", "labels": {"app": "client"}},
    "spec": {"nodeName": "worker-1", "containers": [{"name": "client", "image": "busybox",
                                                     "command": ["sleep", "infinity"]}]},
}


def netplane(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netplane", *args], capture_output=True, text=True,
                          check=check)


def in_pod(pod: str, argv: list[str], namespace: str = "default") -> str:
    """Run argv in a pod's namespace (its resolv.conf included); stdout, raising on failure."""
    proc = netplane("lab", "exec", pod, "-n", namespace, "--", *argv, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"in pod {pod}: {' '.join(argv)} failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    return proc.stdout


def parse_echo(body: str) -> dict:
    """netplane/echo answers `key: value` lines."""
    answer = yaml.safe_load(body)
    if not isinstance(answer, dict) or "pod" not in answer:
        raise ValueError(f"not an echo answer: {body[:200]!r}")
    return answer


def http_get(url: str, host: str | None = None, timeout: float = 3) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def curl_in_pod(pod: str, url: str) -> dict:
    return parse_echo(in_pod(pod, ["curl", "-sS", "--max-time", "3", url]))


def curl_many_in_pod(pod: str, url: str, count: int) -> list[dict]:
    """`count` requests from inside a pod in one go (one exec, a curl per request: new connections)."""
    script = f'for i in $(seq {count}); do curl -sS --max-time 3 "$0"; echo "---"; done'
    out = in_pod(pod, ["sh", "-c", script, url])
    return [parse_echo(part) for part in out.split("---\n") if part.strip()]


async def _ready_replicas(server: str, name: str, namespace: str) -> tuple[int, int]:
    async with Client(server) as client:
        deploy = await client.get("Deployment", name, namespace)
        pods = (await client.list("Pod", namespace))["items"]
    wanted = deploy["spec"].get("replicas", 1)
    selector = deploy["spec"]["selector"].get("matchLabels", {})
    from netplane.objects import matches_labels, pod_is_ready
    ready = [p for p in pods if matches_labels(selector, p["metadata"].get("labels", {})) and pod_is_ready(p)]
    return len(ready), wanted


def wait_deployment(server: str, name: str, namespace: str = "default", timeout: float = 60) -> None:
    def done():
        ready, wanted = asyncio.run(_ready_replicas(server, name, namespace))
        return ready == wanted
    lab.wait_until(done, timeout, f"deployment {namespace}/{name} to be ready", interval=0.3)


async def _pod_ready(server: str, name: str, namespace: str) -> bool:
    from netplane.objects import pod_is_ready
    async with Client(server) as client:
        try:
            return pod_is_ready(await client.get("Pod", name, namespace))
        except Exception:
            return False


def wait_pod(server: str, name: str, namespace: str = "default", timeout: float = 60) -> None:
    lab.wait_until(lambda: asyncio.run(_pod_ready(server, name, namespace)), timeout,
                   f"pod {namespace}/{name} to be ready", interval=0.3)


def ensure_probe_pod(server: str) -> None:
    async def create():
        async with Client(server) as client:
            try:
                await client.create(PROBE_POD)
            except Exception as err:
                if getattr(err, "status", None) != 409:
                    raise
    asyncio.run(create())
    wait_pod(server, PROBE_POD["metadata"]["name"])


async def _load_balancer_ip(server: str, name: str, namespace: str) -> str | None:
    async with Client(server) as client:
        service = await client.get("Service", name, namespace)
    ingress = (service.get("status", {}).get("loadBalancer", {}).get("ingress") or [{}])[0]
    return ingress.get("ip")


def wait_load_balancer_ip(server: str, name: str, namespace: str, timeout: float = 20) -> str:
    """The Service's LoadBalancer address, once allocated and answering HTTP from the host."""
    found: list[str] = []

    def answering():
        address = asyncio.run(_load_balancer_ip(server, name, namespace))
        if address is None:
            return False
        found[:] = [address]
        try:
            return http_get(f"http://{address}/", timeout=1)[0] == 200
        except OSError:
            return False
    lab.wait_until(answering, timeout, f"service {namespace}/{name} to answer on its LoadBalancer address",
                   interval=0.3)
    return found[0]


def hop(title: str) -> None:
    print(f"\n== {title}", flush=True)


def main() -> int:
    server = lab.api_url(lab.lab_nodes(1))
    nodes = [n for n in lab.lab_nodes(3)]
    hop("apply examples/")
    for path in sorted(EXAMPLES.glob("*.yaml")):
        out = netplane("apply", "-f", str(path), check=False)
        print(f"$ netplane apply -f examples/{path.name}\n{out.stdout}{out.stderr}", end="")
    for name in ("echo", "echo-v2"):
        wait_deployment(server, name)
    ensure_probe_pod(server)
    print(netplane("get", "pods", "-o", "wide").stdout)

    hop("DNS: pod 'client' on worker-1 asks kube-dns (10.96.0.10) for echo.default.svc.cluster.local")
    answer = in_pod("client", ["dig", "+short", "echo.default.svc.cluster.local"]).strip()
    print(f"$ dig +short echo.default.svc.cluster.local   ->  {answer}")

    hop("ClusterIP: 30 requests from pod 'client' to http://echo/ (search path -> ClusterIP -> nft DNAT -> a pod)")
    seen = collections.Counter()
    for reply in curl_many_in_pod("client", "http://echo/", 30):
        seen[(reply["pod"], reply["node"])] += 1
    for (pod, node), count in sorted(seen.items()):
        print(f"  {count:2d} answers from {pod} on {node}")
    print(f"  the echo pods saw the client as {reply['client']}")

    hop("NodePort 30007 from the host, on every node's address")
    for node in nodes:
        status, body = http_get(f"http://{node.address}:30007/")
        reply = parse_echo(body)
        print(f"  http://{node.address}:30007/ -> {status} from {reply['pod']} on {reply['node']} "
              f"(it saw the client as {reply['client']})")

    hop("Ingress (NodePort 30080): backend chosen by Host and path")
    for host, path in (("echo.lab", "/"), ("echo.lab", "/v2/hello"), ("v2.echo.lab", "/"), ("nope.lab", "/")):
        status, body = http_get(f"http://{nodes[1].address}:30080{path}", host=host)
        what = f"{parse_echo(body)['pod']} ({parse_echo(body)['image']})" if status == 200 else body.strip()[:60]
        print(f"  Host: {host:<12} {path:<10} -> {status} {what}")

    hop("LoadBalancer: echo-lb's address from the pool, answered (ARP) by one node, reached from the host")
    address = wait_load_balancer_ip(server, "echo-lb", "default")
    status, body = http_get(f"http://{address}/")
    reply = parse_echo(body)
    print(f"  http://{address}/ -> {status} from {reply['pod']} on {reply['node']}")

    hop("the lab stays up for exploring")
    print("  netplane get pods -o wide            netplane get svc,endpointslices")
    print("  netplane lab exec worker-1 -- nft list table ip netplane")
    print("  netplane lab exec client -- dig echo.default.svc.cluster.local")
    print(f"  export KUBECONFIG={lab.LAB_DIR / 'kubeconfig'}   (kubectl works against it too)")
    print("  kubectl logs -l app=echo --prefix   (each request, and the address each pod saw it from)")
    print("  kubectl exec -it client -- sh       kubectl get events")
    print("  kubectl port-forward svc/echo 8080:80   (then curl localhost:8080: reaches a pod's localhost)")
    print("  take it down: netplane lab down   (or: make down)")
    return 0


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    sys.exit(code)
