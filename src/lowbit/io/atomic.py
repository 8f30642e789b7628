"""Publishing outputs atomically: a failure never leaves a half-written file or directory behind.

Everything is written under a temporary name beside the destination and renamed onto it only once complete
(a rename within a directory is atomic), so a reader sees the old output, the new one, or nothing.
Temporary names carry the writing process's id (`.NAME.tmp-PID-xxxx`); a process killed before it could
clean up leaves one behind, and the next write of the same output removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import LowbitError


def check_output(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise LowbitError now if `out` could not be written later: it exists and `overwrite` is not set, or the
    nearest existing parent is not a writable directory. Called before expensive work, so that a minute of
    quantizing is not thrown away on a path mistake."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise LowbitError(f"output {out} already exists (pass --overwrite to replace it)")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise LowbitError(f"cannot write {out}: {parent} is not a writable directory")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False, what: str | None = None, first_wins: bool = False):
    """Yield a temporary directory beside `out`; rename it to `out` only if the block succeeds, replacing an
    existing `out` only if `overwrite`. An OSError (in here or in the block) becomes a LowbitError naming
    the output (as `what` says, e.g. "the offload directory", if given).

    first_wins (caches: any complete copy is as good as another): an `out` that another process published
    while the block ran stays, and this copy is dropped, so that a reader of the first never sees it swapped
    away; an `out` that existed before the block is replaced as `overwrite` says."""
    out = Path(out)
    existed = out.exists()
    if existed and not overwrite:
        raise LowbitError(f"output {out} already exists (pass --overwrite to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(out, "tmp"), dir=out.parent))
    except OSError as e:
        where = f"{what} {out}" if what else f"to {out.parent}"
        raise LowbitError(f"cannot write {where}: {e.strerror or e}") from None
    try:
        yield tmp
        _publishable(tmp)
        if first_wins and not existed and out.exists():
            return   # published by another process meanwhile: theirs stays (the finally removes ours)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=_prefix(out, "old"), dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        raise LowbitError(f"cannot write {what + ' ' if what else ''}{out}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary file path beside `out` (an empty file) to write; it is renamed onto `out` only if the
    block succeeds, replacing an existing `out` only if `overwrite`, and removed otherwise. An OSError becomes a
    LowbitError naming the output."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise LowbitError(f"output {out} already exists (pass --overwrite to replace it)")
    if out.is_dir():
        raise LowbitError(f"output {out} is a directory, not a file")
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        fd, name = tempfile.mkstemp(prefix=_prefix(out, "tmp"), dir=out.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except OSError as e:
        raise LowbitError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if tmp is not None and tmp.exists():
            with contextlib.suppress(OSError):
                tmp.unlink()


def _prefix(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive
        return True
    return True


def remove_stale(out: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and directories that earlier writes of `out` left behind when their
    process died (their names carry its id). Returns what was removed."""
    out = Path(out)
    removed = []
    for kind in ("tmp", "old"):
        for p in out.parent.glob(f".{glob.escape(out.name)}.{kind}-*-*"):
            pid = p.name[len(f".{out.name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()
                removed.append(p)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publishable(tmp: Path) -> None:
    """mkdtemp makes a private directory and some writers make private files: give them normal modes."""
    mask = _umask()
    os.chmod(tmp, 0o777 & ~mask)
    for p in tmp.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file renamed onto it."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)
        fd, tmp = tempfile.mkstemp(prefix=_prefix(path, "tmp"), dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise LowbitError(f"cannot write {path}: {e.strerror or e}") from None


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """Write a matplotlib figure as a PNG at `path`, atomically (a renamed temporary file), and close it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    except OSError as e:
        raise LowbitError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
        import matplotlib.pyplot as plt
        plt.close(fig)
