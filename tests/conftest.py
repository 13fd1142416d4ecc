"""Shared fixtures. Kernel tests create namespaces named with our marker and remove them even on failure."""
from __future__ import annotations

import os
import shutil
import uuid

import pytest

from netplane import netns

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2 for network namespaces")


def unique_name(prefix: str) -> str:
    """A marker-prefixed unique name, short enough for a link name (15 chars)."""
    return f"np-{prefix}-{uuid.uuid4().hex[:6]}"[:15]


@pytest.fixture
def make_netns():
    """make_netns('cli') -> name of a fresh namespace (loopback up); all removed after the test."""
    made: list[str] = []

    def make(prefix: str = "t") -> str:
        name = unique_name(prefix)
        netns.add(name)
        made.append(name)
        return name

    yield make
    for name in reversed(made):
        netns.delete(name)
