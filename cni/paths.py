"""The few os/os.path functions the plugin needs, on the posix module alone.

`import os` costs ~0.9 ms per exec (it brings _collections_abc and posixpath), and a plugin is exec'd
once per pod; the plugin's modules use posix directly and these for paths.
"""
import posix

_S_IFMT, _S_IFDIR = 0o170000, 0o040000


def join(directory: str, name: str) -> str:
    """os.path.join of two parts."""
    if name.startswith("/") or not directory:
        return name
    return directory + name if directory.endswith("/") else f"{directory}/{name}"


def exists(path: str) -> bool:
    try:
        posix.stat(path)
    except (OSError, ValueError):
        return False
    return True


def makedirs(path: str, mode: int = 0o777) -> None:
    """os.makedirs(path, mode, exist_ok=True): the missing parents too; an existing directory is fine."""
    try:
        posix.mkdir(path, mode)
    except FileExistsError:
        if posix.stat(path).st_mode & _S_IFMT != _S_IFDIR:
            raise
    except FileNotFoundError:
        parent = path.rstrip("/").rpartition("/")[0]
        if not parent:
            raise
        makedirs(parent, mode)
        try:
            posix.mkdir(path, mode)
        except FileExistsError:
            pass
