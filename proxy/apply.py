"""The thin shell: hand rendered rules to the kernel in one transaction, remember what was applied.

A backend turns a Model into one transaction (the whole table on the first sync or after a
failure, only what changed afterwards), applies it at once (`nft -f` / `iptables-restore`; an
nftables partial sync through nft's own library in process, see NftLibrary), and only then
records it as applied: a failed apply leaves the kernel's old rules in place (the transaction is
atomic) and makes the next sync a full one.
"""
from __future__ import annotations

import subprocess
import weakref
from dataclasses import dataclass

from netplane import netns
from netplane.proxy import iptables, nft
from netplane.proxy.model import Model

APPLY_TIMEOUT = 300  # seconds
ERROR_CHARS = 2000  # a failed 10,000-Service transaction can print megabytes; keep the start


class ApplyError(RuntimeError):
    pass


@dataclass
class SyncResult:
    full: bool
    services: int  # Service ports programmed
    chains: int
    rules: int
    bytes: int


def run_with_input(argv: list[str], text: str, namespace: str | None = None) -> None:
    try:
        netns.run(argv, netns=namespace, input=text, timeout=APPLY_TIMEOUT)
    except subprocess.TimeoutExpired:
        # killed mid-way: whether its transaction committed is unknown (the caller resyncs fully)
        raise ApplyError(f"{' '.join(argv)} timed out after {APPLY_TIMEOUT}s") from None
    except netns.CommandError as err:
        output = _shortened((err.stderr or err.stdout).strip())
        raise ApplyError(f"{' '.join(argv)} failed (exit {err.returncode}): {output}") from None


def _shortened(output: str) -> str:
    return output if len(output) <= ERROR_CHARS else output[:ERROR_CHARS] + f"... ({len(output)} chars)"


class NftLibrary:
    """nft's own library (libnftables: the parser and batch code of the `nft` command) in this
    process, for the small transactions of partial syncs. Each run() is one atomic transaction,
    exactly as `nft -f`, with two costs fewer: no nft process (3-4 ms), and the netlink socket
    stays open (an nft process closing its socket after a transaction that deleted anything
    waits for the kernel to free it, an RCU grace period: 15-20 ms here). Full syncs still run
    `nft -f`: its memory for a 12 MB transaction is its own, and returned when it exits."""

    def __init__(self, namespace: str | None = None):
        import ctypes

        self.namespace = namespace
        self.lib = lib = ctypes.CDLL("libnftables.so.1")
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.ctx = None

    def run(self, text: str) -> None:
        with netns.inside(self.namespace):  # the socket is made, and stays, in the namespace
            if self.ctx is None:
                self.ctx = self.lib.nft_ctx_new(0)
                self.lib.nft_ctx_buffer_error(self.ctx)
                weakref.finalize(self, self.lib.nft_ctx_free, self.ctx)  # its socket and cache
            failed = self.lib.nft_run_cmd_from_buffer(self.ctx, text.encode())
        if failed:
            output = (self.lib.nft_ctx_get_error_buffer(self.ctx) or b"").decode(errors="replace").strip()
            raise ApplyError(f"nft (libnftables) failed: {_shortened(output)}")


def nft_library(namespace: str | None) -> NftLibrary | None:
    """The in-process nft, or None where libnftables is missing (then `nft -f` does it all)."""
    try:
        return NftLibrary(namespace)
    except OSError:
        return None


class NftBackend:
    name = "nftables"

    def __init__(self, namespace: str | None = None):
        self.namespace = namespace
        self.applied: list[nft.Table] | None = None
        self.builder = nft.TableBuilder()  # re-uses the rules of Service ports that did not change
        self.library = nft_library(namespace)

    def plan(self, model: Model, force_full: bool = False) -> tuple[str, list[nft.Table], bool]:
        """(transaction text, the tables it produces, whether it is a full sync). Pure but for
        the builder's cache of rendered Service ports."""
        tables = nft.render_tables(model, self.builder)
        if not force_full and self.applied is not None and len(self.applied) == len(tables):
            deltas = [nft.delta_transaction(old, new) for old, new in zip(self.applied, tables)]
            if all(d is not None for d in deltas):
                return "".join(deltas), tables, False
        return "\n".join(nft.full_transaction(t, readable=False) for t in tables), tables, True

    def sync(self, model: Model, force_full: bool = False) -> SyncResult:
        text, tables, full = self.plan(model, force_full)
        if text.strip():
            try:
                if full or self.library is None:
                    run_with_input(["nft", "-f", "-"], text, self.namespace)
                else:
                    self.library.run(text)
            except BaseException:  # ApplyError, or anything else mid-way (nft missing, interrupted)
                self.applied = None  # we no longer know exactly what is in the kernel
                raise
        if full:
            for table in tables:  # counted now, not in the first partial sync after
                table.element_refs(), table.shared_refs()
        self.applied = tables
        return SyncResult(full, len(model.ports), sum(t.chain_count() for t in tables),
                          sum(t.rule_count() for t in tables), len(text))

    def cleanup(self) -> None:
        run_with_input(["nft", "-f", "-"], nft.cleanup_transaction(), self.namespace)
        self.applied = None


class IptablesBackend:
    name = "iptables"

    def __init__(self, namespace: str | None = None, command: str = "iptables"):
        self.namespace = namespace
        self.command = command  # "iptables", "iptables-legacy" or "iptables-nft"
        self.applied: dict[int, iptables.Ruleset] | None = None
        self.builder = iptables.RulesetBuilder()  # re-uses the rules of Service ports that did not change

    def _restore(self, family: int) -> str:
        base = self.command.replace("iptables", "ip6tables") if family == 6 else self.command
        return f"{base}-restore"

    def _save(self, family: int) -> str:
        base = self.command.replace("iptables", "ip6tables") if family == 6 else self.command
        return f"{base}-save"

    def plan(self, model: Model, force_full: bool = False, saved: dict[int, str] | None = None):
        """({family: restore text}, {family: Ruleset}, full?). Pure; `saved` is iptables-save
        output per family, used by a full sync to delete our chains left from before."""
        rulesets = {f: self.builder.render(model, f) for f in model.node.families}
        full = force_full or self.applied is None or set(self.applied) != set(rulesets)
        if full:
            texts = {f: iptables.restore_text(rs, (saved or {}).get(f, "")) for f, rs in rulesets.items()}
        else:
            texts = {f: iptables.delta_restore_text(self.applied[f], rs) for f, rs in rulesets.items()}
        return texts, rulesets, full

    def _saved(self, family: int) -> str:
        return netns.run([self._save(family)], netns=self.namespace, check=False).stdout

    def sync(self, model: Model, force_full: bool = False) -> SyncResult:
        try:
            full = force_full or self.applied is None
            saved = {}
            if full:
                saved = {f: self._saved(f) for f in model.node.families}
                self._ensure_jumps(saved)
                saved = {f: self._saved(f) for f in model.node.families}
            texts, rulesets, full = self.plan(model, force_full=full, saved=saved)
            # One restore per family, each atomic: when the second fails the first has been
            # applied, so after any failure nothing is assumed and the next sync is a full one.
            for family, text in texts.items():
                run_with_input([self._restore(family), "-w", "5", "--noflush", "--counters"],
                               text, self.namespace)
        except BaseException:
            self.applied = None
            raise
        self.applied = rulesets
        return SyncResult(full, len(model.ports), sum(r.chain_count() for r in rulesets.values()),
                          sum(r.rule_count() for r in rulesets.values()),
                          sum(len(t) for t in texts.values()))

    def _ensure_jumps(self, saved: dict[int, str]) -> None:
        """Create our top-level chains and the jumps to them from the built-in chains, once."""
        for family, current in saved.items():
            text = iptables.jump_setup_text(current)
            if text:
                run_with_input([self._restore(family), "-w", "5", "--noflush"], text, self.namespace)

    def cleanup(self) -> None:
        for family in (4, 6):
            proc = netns.run([self._save(family)], netns=self.namespace, check=False)
            if proc.returncode != 0:
                continue  # no such family or tool: nothing of ours there
            text = iptables.cleanup_text(proc.stdout)
            if text:
                run_with_input([self._restore(family), "-w", "5", "--noflush"], text, self.namespace)
        self.applied = None


def backend_for(name: str, namespace: str | None = None):
    if name == "nftables":
        return NftBackend(namespace)
    if name in ("iptables", "iptables-legacy", "iptables-nft"):
        return IptablesBackend(namespace, command=name)
    raise ValueError(f"unknown backend {name!r}: nftables, iptables, iptables-legacy or iptables-nft")
