"""The proxy's reconcile loop and backends on their failure paths, without root: never programming
from partial state (Services listed, EndpointSlices not yet), a failed apply keeping the old
rules and being retried as a full sync. The real NftBackend and IptablesBackend run with the
command runner (netns.run) replaced by a fake kernel that records each transaction."""
from __future__ import annotations

import asyncio
import subprocess

import pytest

from netplane import netns
from netplane.client import WatchView
from netplane.proxy import apply, iptables
from netplane.proxy.apply import ApplyError, IptablesBackend, NftBackend, SyncResult
from netplane.proxy.model import NodeFacts, build_model
from netplane.proxy.proxier import Proxier, follow

NODE = NodeFacts(name="worker-1", node_ips=("192.168.56.11",), cluster_cidrs=("10.244.0.0/16",))


def service(name, cluster_ip):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}


def endpoint_slice(service_name, *ips):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{service_name}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "endpoints": [{"addresses": [ip], "nodeName": "worker-2"} for ip in ips],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


WEB, WEB_SLICE = service("web", "10.96.0.50"), endpoint_slice("web", "10.244.1.10")
API, API_SLICE = service("api", "10.96.0.51"), endpoint_slice("api", "10.244.2.10")


def model(*objs):
    return build_model([o for o in objs if o["kind"] == "Service"],
                       [o for o in objs if o["kind"] == "EndpointSlice"], NODE)


async def eventually(predicate, timeout=5.0, what="condition"):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# --- a fake kernel behind netns.run ------------------------------------------------------------

class FakeKernel:
    """Stands in for netns.run: records every command with its input; `fail` makes the next
    apply (nft -f / *-restore) fail like the real command does, `timeout` makes it hang."""

    def __init__(self):
        self.applies: list[tuple[list[str], str]] = []
        self.fail = False
        self.timeout = False
        self.saves = 0

    def run(self, argv, netns=None, check=True, input=None, timeout=60):
        argv = list(argv)
        if argv[0].endswith("-save"):
            self.saves += 1
            return subprocess.CompletedProcess(argv, 0, "", "")
        self.applies.append((argv, input))
        if self.timeout:
            raise subprocess.TimeoutExpired(argv, timeout)
        if self.fail:
            raise netns_module.CommandError(argv, 1, "", "Error: Could not process rule: Device or resource busy")
        return subprocess.CompletedProcess(argv, 0, "", "")

    @property
    def last(self) -> str:
        return self.applies[-1][1]

    def library(self, namespace=None) -> "FakeLibrary":
        return FakeLibrary(self)


class FakeLibrary:
    """Stands in for the in-process nft (apply.NftLibrary), recording into the same kernel."""
    ARGV = ["libnftables"]

    def __init__(self, kernel: FakeKernel):
        self.kernel = kernel

    def run(self, text: str) -> None:
        self.kernel.applies.append((self.ARGV, text))
        if self.kernel.fail:
            raise ApplyError("nft (libnftables) failed: Error: Could not process rule: Device or resource busy")


netns_module = netns


@pytest.fixture
def kernel(monkeypatch):
    fake = FakeKernel()
    monkeypatch.setattr(netns, "run", fake.run)
    monkeypatch.setattr(apply, "nft_library", fake.library)
    return fake


FULL_NFT = "delete table ip netplane"  # a full transaction recreates our table; a delta never does


def test_nft_backend_after_a_failed_apply_sends_the_whole_table_next_time(kernel):
    backend = NftBackend("np-fake")
    assert backend.sync(model(WEB, WEB_SLICE)).full
    assert FULL_NFT in kernel.last

    kernel.fail = True
    with pytest.raises(ApplyError, match="Device or resource busy"):
        backend.sync(model(WEB, WEB_SLICE, API, API_SLICE))  # a delta: only "api" is new
    argv, failed = kernel.applies[-1]
    assert argv == FakeLibrary.ARGV and len(kernel.applies) == 2  # one atomic transaction per sync
    assert FULL_NFT not in failed and "default/api" in failed and "default/web" not in failed
    assert backend.applied is None  # what the kernel holds is no longer assumed

    kernel.fail = False
    result = backend.sync(model(WEB, WEB_SLICE, API, API_SLICE))
    assert result.full and FULL_NFT in kernel.last
    assert "default/web" in kernel.last and "default/api" in kernel.last  # the whole table, both

    calls = len(kernel.applies)
    again = backend.sync(model(WEB, WEB_SLICE, API, API_SLICE))
    assert not again.full and len(kernel.applies) == calls  # back to deltas: nothing changed, nothing sent


def test_nft_backend_timed_out_apply_is_an_apply_error_and_forces_a_full_sync(kernel):
    # `nft -f` (full syncs) can hang on a busy kernel; partial ones run in process
    backend = NftBackend()
    backend.sync(model(WEB, WEB_SLICE))
    kernel.timeout = True
    with pytest.raises(ApplyError, match="timed out"):
        backend.sync(model(WEB, WEB_SLICE, API, API_SLICE), force_full=True)
    assert backend.applied is None
    kernel.timeout = False
    assert backend.sync(model(WEB, WEB_SLICE, API, API_SLICE)).full and FULL_NFT in kernel.last


def test_nft_backend_forced_full_sync_even_when_a_delta_would_do(kernel):
    backend = NftBackend()
    backend.sync(model(WEB, WEB_SLICE))
    assert not backend.sync(model(WEB, WEB_SLICE, API, API_SLICE)).full
    assert FULL_NFT not in kernel.last
    assert backend.sync(model(WEB, WEB_SLICE, API, API_SLICE), force_full=True).full
    assert FULL_NFT in kernel.last


def service_chains(m, table="nat"):
    return [c for c in iptables.render_ruleset(m, 4).tables[table] if iptables.is_service_chain(c)]


def test_iptables_backend_after_a_failed_apply_rewrites_every_chain_next_time(kernel):
    backend = IptablesBackend("np-fake", command="iptables-nft")
    both = model(WEB, WEB_SLICE, API, API_SLICE)
    web_chains = service_chains(model(WEB, WEB_SLICE))
    assert web_chains
    assert backend.sync(model(WEB, WEB_SLICE)).full
    saves = kernel.saves

    kernel.fail = True
    with pytest.raises(ApplyError):
        backend.sync(both)
    assert kernel.applies[-1][0][0] == "iptables-nft-restore"
    assert not any(f":{c} " in kernel.last for c in web_chains)  # the failed one was a delta
    assert backend.applied is None

    kernel.fail = False
    result = backend.sync(both)
    assert result.full and kernel.saves > saves  # a full sync reads the kernel's chains again
    assert all(f":{c} " in kernel.last for c in service_chains(both))


# --- the reconcile loop --------------------------------------------------------------------

class FakeClient:
    """An API server for the real WatchView's informers: lists answer at once, except those of
    the kinds in `slow`, which answer only when `release(kind)` is called; watches stay open
    and quiet."""

    def __init__(self, objects, slow=()):
        self.objects = objects
        self.gates = {kind: asyncio.Event() for kind in slow}

    def release(self, kind):
        self.gates[kind].set()

    async def list(self, kind, namespace=None, label_selector=None, field_selector=None):
        if kind.kind in self.gates:
            await self.gates[kind.kind].wait()
        return {"items": [dict(o) for o in self.objects if o["kind"] == kind.kind],
                "metadata": {"resourceVersion": "1"}}

    async def watch(self, kind, namespace=None, resource_version="", label_selector=None,
                    field_selector=None, timeout_seconds=300):
        await asyncio.Event().wait()
        yield  # pragma: no cover


class RecordingBackend:
    """A backend that keeps what it was given; `fail` failures to come, each an ApplyError.
    `kernel` is what an atomic apply left in place: changed only by a successful one."""
    name = "fake"
    namespace = None

    def __init__(self):
        self.calls: list[tuple[bool, object]] = []  # (force_full, model)
        self.fail = 0
        self.kernel = None

    def sync(self, model, force_full=False):
        self.calls.append((force_full, model))
        if self.fail:
            self.fail -= 1
            raise ApplyError("nft -f - failed (exit 1): Error: Could not process rule")
        self.kernel = model
        return SyncResult(force_full, len(model.ports), 1, 1, 1)


def endpoints_of(m):
    return {f"{p.namespace}/{p.name}": [e.ip for e in p.endpoints] for p in m.ports}


def test_nothing_is_programmed_until_services_and_endpoint_slices_have_both_synced():
    async def scenario():
        client = FakeClient([WEB, WEB_SLICE], slow=["EndpointSlice"])
        view = WatchView(client, ["Service", "EndpointSlice"])
        backend = RecordingBackend()
        proxier = Proxier(view, NODE, backend, clean_conntrack=False)
        stop = asyncio.Event()
        task = asyncio.create_task(follow(view, proxier, stop, min_interval=0))
        try:
            await eventually(lambda: view.informers["Service"].synced.is_set(), what="Services listed")
            await asyncio.sleep(0.3)  # Services known, EndpointSlices not: "web" would be a REJECT
            assert backend.calls == []
            assert not proxier.healthy()[0]
            await proxier.sync()  # even asked directly, the proxier does not program half a picture
            assert backend.calls == []

            client.release("EndpointSlice")
            await eventually(lambda: backend.calls, what="the first sync")
            assert endpoints_of(backend.calls[0][1]) == {"default/web": ["10.244.1.10"]}
            assert proxier.healthy() == (True, "ok")
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)
            await view.stop()
    asyncio.run(scenario())


class StaticView:
    """Synced objects whose changes the test makes, telling the listeners as a watch would."""

    def __init__(self, objs):
        self.objs, self.listeners = list(objs), []

    def list(self, kind):
        return [o for o in self.objs if o["kind"] == kind]

    def add_listener(self, listener):
        self.listeners.append(listener)

    async def start(self):
        pass

    async def wait_synced(self):
        pass

    def is_synced(self):
        return True

    def change(self, objs):
        self.objs = list(objs)
        for listener in self.listeners:
            listener()


def test_a_failed_apply_keeps_the_old_rules_and_is_retried_as_a_full_sync():
    async def scenario():
        view = StaticView([WEB, WEB_SLICE])
        backend = RecordingBackend()
        proxier = Proxier(view, NODE, backend, clean_conntrack=False)
        stop = asyncio.Event()
        task = asyncio.create_task(follow(view, proxier, stop, min_interval=0, retry_interval=0.05))
        try:
            await eventually(lambda: len(backend.calls) == 1, what="the first sync")
            programmed = backend.kernel

            backend.fail = 2
            view.change([WEB, WEB_SLICE, API, API_SLICE])
            await eventually(lambda: len(backend.calls) == 4, what="two retries")  # no new change needed
            assert [full for full, _ in backend.calls] == [False, False, True, True]
            assert all("default/api" in endpoints_of(m) for _, m in backend.calls[1:])
            assert backend.calls[3][1] is not programmed and backend.kernel is backend.calls[3][1]
            assert proxier.healthy() == (True, "ok") and proxier.pending_since is None

            view.change([API, API_SLICE])
            await eventually(lambda: len(backend.calls) == 5, what="the next change")
            assert backend.calls[4][0] is False  # after a success, back to partial syncs
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)
    asyncio.run(scenario())


def test_the_kernel_keeps_the_old_rules_while_an_apply_fails(kernel):
    """The proxier with the real NftBackend: while applies fail, the kernel was never sent
    anything but whole transactions (nothing half-applied), and the retry is a full one."""
    async def scenario():
        view = StaticView([WEB, WEB_SLICE])
        proxier = Proxier(view, NODE, NftBackend(), clean_conntrack=False)
        await proxier.sync()
        kernel.fail = True
        view.change([WEB, WEB_SLICE, API, API_SLICE])
        with pytest.raises(ApplyError):
            await proxier.sync()
        assert proxier.pending_since is not None and proxier.force_full
        kernel.fail = False
        await proxier.sync()
        assert FULL_NFT in kernel.last and "default/api" in kernel.last
        assert not proxier.force_full and proxier.pending_since is None
    asyncio.run(scenario())


def test_without_libnftables_partial_syncs_run_nft_f(monkeypatch):
    """Where libnftables.so.1 cannot be loaded, nothing changes but the way a delta is applied."""
    import ctypes

    def missing(name, *args, **kwargs):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert apply.nft_library(None) is None
    fake = FakeKernel()
    monkeypatch.setattr(netns, "run", fake.run)
    backend = NftBackend()
    assert backend.library is None
    assert backend.sync(model(WEB, WEB_SLICE)).full
    assert not backend.sync(model(WEB, WEB_SLICE, API, API_SLICE)).full
    argv, text = fake.applies[-1]
    assert argv == ["nft", "-f", "-"] and "default/api" in text and FULL_NFT not in text
