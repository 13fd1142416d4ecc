"""Golden files: for each case in tests/unit/golden/proxy/*.yaml (objects, with the node flags in a
`# flags:` line), the exact nft text and iptables-restore text the proxy renders.

Regenerate after an intended change with: NETPLANE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_proxy_golden.py
and review the diff like code.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from netplane.proxy import cli

GOLDEN = Path(__file__).parent / "golden" / "proxy"
CASES = sorted(p.stem for p in GOLDEN.glob("*.yaml"))
UPDATE = os.environ.get("NETPLANE_UPDATE_GOLDEN") == "1"


def case_flags(case: str) -> list[str]:
    for line in (GOLDEN / f"{case}.yaml").read_text().splitlines():
        if line.startswith("# flags:"):
            return shlex.split(line.split(":", 1)[1])
    return []


def render(case: str, backend: str) -> str:
    args = cli.parser().parse_args(["render", "--objects", str(GOLDEN / f"{case}.yaml"),
                                    "--backend", backend, *case_flags(case)])
    model = cli.model_from_file(args.objects, cli.node_facts(args))
    assert not model.errors, model.errors
    return cli.render_text(model, backend)


@pytest.mark.parametrize("backend,suffix", [("nftables", "nft"), ("iptables", "iptables")])
@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, backend: str, suffix: str) -> None:
    path = GOLDEN / f"{case}.{suffix}"
    text = render(case, backend)
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path.name} is missing (NETPLANE_UPDATE_GOLDEN=1 writes it; review it before committing)"
    assert text == path.read_text(), f"{path.name} differs (NETPLANE_UPDATE_GOLDEN=1 to regenerate)"


def test_there_are_cases() -> None:
    assert {"overall", "multiport", "no-endpoints", "traffic-policy", "dual-stack"} <= set(CASES)
