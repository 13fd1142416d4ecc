"""`python -m netplane.cni.install DIR`: write a fast `netplane-cni` launcher into a CNI plugin directory.

pip's console script (.venv/bin/netplane-cni) starts the interpreter with site initialisation: with an
editable install that alone is ~15-20 ms, more than the reference bridge plugin's whole ADD, paid once
per pod. The launcher runs the real interpreter with -I -S (no site, no user paths, no PYTHON*
variables) and points the import system straight at this package, so an exec costs the interpreter's
bare start-up (~8 ms) plus the plugin's own work.
"""
from __future__ import annotations

import os
import sys

import netplane
import netplane.cni

NAME = "netplane-cni"

_TEMPLATE = """#!{python} -IS
# netplane-cni launcher, written by `python -m netplane.cni.install`: a CNI plugin is exec'd once per
# pod, so this skips site initialisation and imports the plugin package from where it is installed.
import sys
sys.path[:0] = [{netplane_parent!r}]
package = type(sys)("netplane.cni")
package.__path__ = [{cni_dir!r}]
sys.modules["netplane.cni"] = package
from netplane.cni.plugin import main
sys.exit(main())
"""


def launcher_text(python: str | None = None) -> str:
    """The launcher for this interpreter and this installation of netplane (editable or not)."""
    return _TEMPLATE.format(
        python=python or os.path.realpath(sys.executable),
        netplane_parent=os.path.dirname(os.path.dirname(os.path.abspath(netplane.__file__))),
        cni_dir=os.path.dirname(os.path.abspath(netplane.cni.__file__)))


def install(directory: str) -> str:
    """Write DIR/netplane-cni (atomically, mode 755); returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, NAME)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(launcher_text())
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print(f"usage: python -m netplane.cni.install DIR   (writes DIR/{NAME})", file=sys.stderr)
        return 2
    print(install(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
