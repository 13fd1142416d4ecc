"""`python -m netplane.cni.install DIR`: write a fast `netplane-cni` launcher into a CNI plugin directory.

pip's console script (.venv/bin/netplane-cni) starts the interpreter with site initialisation: with an
editable install that alone is ~15-20 ms, more than the reference bridge plugin's whole ADD, paid once
per pod. The launcher runs the real interpreter with -I -S (no site, no user paths, no PYTHON*
variables) and points the import system straight at this package, so an exec costs the interpreter's
bare start-up (~7 ms) plus the plugin's own work. It first offers ADD and DEL to the node's resident
helper (forward.py, helper.py), and runs the plugin itself only when none answers; it exits without
the interpreter's finalization (plugin.main_and_exit). Installing also compiles the package's bytecode into
its __pycache__ (where the launcher's imports look), so no pod pays for compiling it, even where
PYTHONDONTWRITEBYTECODE is set for everything else.
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
from netplane.cni.forward import forward_or_read_stdin
stdin = forward_or_read_stdin()   # returns only when no node helper took the command
from netplane.cni.plugin import main_and_exit
main_and_exit(stdin)
"""


def launcher_text(python: str | None = None) -> str:
    """The launcher for this interpreter and this installation of netplane (editable or not)."""
    return _TEMPLATE.format(
        python=python or os.path.realpath(sys.executable),
        netplane_parent=os.path.dirname(os.path.dirname(os.path.abspath(netplane.__file__))),
        cni_dir=os.path.dirname(os.path.abspath(netplane.cni.__file__)))


def compile_bytecode() -> bool:
    """Compile netplane/__init__.py and the plugin package for this interpreter; False when it could not
    (a read-only installation: then pip compiled them, or each exec compiles what it imports)."""
    import compileall
    ok = compileall.compile_file(os.path.abspath(netplane.__file__), quiet=2)
    return bool(compileall.compile_dir(os.path.dirname(os.path.abspath(netplane.cni.__file__)), quiet=2)) and bool(ok)


def install(directory: str) -> str:
    """Write DIR/netplane-cni (atomically, mode 755) after compiling the bytecode; returns its path."""
    compile_bytecode()
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
