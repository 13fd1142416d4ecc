"""The executable's error paths (they end before any kernel work, so no root is needed), its launcher,
and the promise that the plugin imports nothing heavy."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from netplane.cni import install, plugin

CONFIG = {"cniVersion": "1.0.0", "name": "unit", "type": "netplane-cni",
          "ipam": {"type": "netplane", "ranges": [[{"subnet": "10.244.1.0/24"}]], "dataDir": "/nonexistent"}}
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/np-nonexistent",
       "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}


def run_plugin(stdin, argv=None, **env_changes):
    env = {k: v for k, v in {**os.environ, **ENV, **env_changes}.items() if v is not None}
    text = stdin if isinstance(stdin, str) else json.dumps(stdin)
    proc = subprocess.run(argv or [sys.executable, "-m", "netplane.cni.plugin"], input=text, env=env,
                          capture_output=True, text=True, timeout=30)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None


@pytest.mark.parametrize("stdin, env, code, words", [
    ("{not json", {}, 6, "not valid JSON"),
    ("[1, 2]", {}, 6, "JSON object"),
    ({**CONFIG, "cniVersion": "9.9.9"}, {}, 1, "incompatible CNI versions"),
    (CONFIG, {"CNI_CONTAINERID": None}, 4, "CNI_CONTAINERID"),
    (CONFIG, {"CNI_NETNS": None}, 4, "CNI_NETNS"),
    (CONFIG, {"CNI_COMMAND": None}, 4, "CNI_COMMAND"),
    ({**CONFIG, "name": ""}, {}, 7, "name"),
    ({**CONFIG, "ipam": {"ranges": [[{"subnet": "10.1.1.1/24"}]]}}, {}, 7, "ipam.ranges[0][0].subnet"),
    ({**CONFIG, "vlan": 7}, {}, 2, "vlan=7"),
    (CONFIG, {}, 4, "CNI_NETNS '/run/netns/np-nonexistent' does not exist"),
    ({**CONFIG, "cniVersion": "0.3.1"}, {"CNI_COMMAND": "CHECK"}, 1, "CHECK"),
    (CONFIG, {"CNI_COMMAND": "GC"}, 1, "GC"),
])
def test_errors_are_spec_json_with_the_right_code(stdin, env, code, words):
    rc, reply = run_plugin(stdin, **env)
    assert rc == 1
    assert reply["code"] == code, reply
    assert words in reply["msg"] + reply.get("details", "")
    assert reply["cniVersion"] in ("1.0.0", "0.3.1", "9.9.9", "1.1.0")


def test_version():
    assert run_plugin({"cniVersion": "1.0.0"}, CNI_COMMAND="VERSION") == (
        0, {"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    assert run_plugin("", CNI_COMMAND="VERSION")[1]["cniVersion"] == "1.1.0"


def test_launcher_runs_the_plugin_without_site(tmp_path):
    path = install.install(str(tmp_path))
    text = open(path).read()
    assert text.startswith("#!/") and " -IS\n" in text.splitlines()[0] + "\n"
    assert os.access(path, os.X_OK)
    assert run_plugin({"cniVersion": "0.4.0"}, argv=[path], CNI_COMMAND="VERSION")[1]["cniVersion"] == "0.4.0"
    rc, reply = run_plugin("{", argv=[path])
    assert (rc, reply["code"]) == (1, 6)


def test_launcher_runs_the_plugin_without_importing_os(tmp_path):
    """`import os` alone costs ~0.9 ms per exec (_collections_abc, posixpath): the plugin uses posix."""
    path = install.install(str(tmp_path))
    python = open(path).readline()[2:].split()[0]
    proc = subprocess.run([python, "-IS", "-X", "importtime", path], input='{"cniVersion": "1.0.0"}',
                          env={"CNI_COMMAND": "VERSION"}, capture_output=True, text=True)
    assert proc.returncode == 0 and '"supportedVersions"' in proc.stdout, proc.stdout + proc.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "netplane.cni.plugin" in imported
    assert not {"os", "_collections_abc", "posixpath"} & imported


def test_plugin_imports_nothing_heavy():
    """A plugin is exec'd once per pod: importing pyroute2 alone costs more than the reference plugin's
    whole ADD, json/re/subprocess/dataclasses/hashlib cost ~5-20 ms each, and ipaddress (with functools
    and collections), ctypes, select and even __future__ cost 0.2-5 ms each (ctypes' core, select and the
    masquerade code load only when used)."""
    code = ("import sys; before = set(sys.modules); import netplane.cni.plugin; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ}).stdout.split()
    heavy = {"pyroute2", "json", "re", "subprocess", "dataclasses", "hashlib", "typing", "socket", "asyncio",
             "logging", "enum", "inspect", "contextlib", "ipaddress", "collections", "functools", "__future__",
             "ctypes", "_ctypes", "select", "netplane.cni.masq", "netplane.cni.proc"}
    assert not heavy & set(out), sorted(heavy & set(out))


def test_host_veth_name_is_stable_and_short():
    name = plugin.host_veth_name("c1", "eth0")
    assert name == plugin.host_veth_name("c1", "eth0") != plugin.host_veth_name("c1", "eth1")
    assert name.startswith("np-") and len(name) == 15
