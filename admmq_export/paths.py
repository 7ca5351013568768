"""Where shared data and models live (env ADMMQ_SHARED, default ../shared beside the repo) and safe writes."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    return Path(os.environ.get("ADMMQ_SHARED", REPO_ROOT.parent / "shared")).resolve()


def shared(*parts: str) -> Path:
    return shared_dir().joinpath(*parts)


def cache_dir() -> Path:
    d = Path(os.environ.get("ADMMQ_CACHE", Path.home() / ".cache" / "admmq-export"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def check_writable(out: Path) -> None:
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UserError(f"output folder {parent} does not exist", "create it or choose another -o path")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output folder {parent} is not writable", "choose a writable -o path")


@contextlib.contextmanager
def atomic_path(out: str | os.PathLike, directory: bool = False):
    """Yield a temporary path beside `out`; rename it to `out` only if the block succeeds."""
    out = Path(out)
    check_writable(out)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory and out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        if tmp.exists():  # mkstemp/mkdtemp create 0600/0700: give the output the usual umask-based mode
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~umask)
        os.replace(tmp, out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
