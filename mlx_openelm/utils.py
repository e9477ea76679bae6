"""Small helpers every layer uses: atomic writes, one-line error text, the progress callback type.

Atomic writes have one home here: a file is written to a temporary sibling and renamed over
the target, a folder is built as a hidden sibling and renamed into place, so a failure (or a
kill) never leaves a half-written file or folder under the name the user asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

PathLike = Union[str, Path]

# progress(label, done, total): the library's only way to report long work; the CLI draws bars.
Progress = Callable[[str, int, int], None]

PARTIAL_TAG = ".partial-"  # hidden build folders: .<name>.partial-XXXX
OWNER_FILE = ".owner"  # inside a build folder: "<host> <pid>" of the process writing it
STALE_SECONDS = 3600  # a partial folder of unknown owner untouched this long belongs to a dead writer


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: PathLike, write: Callable[[str], None], mode: int = 0o644) -> Path:
    """Call ``write(tmp_path)`` on a temporary sibling of ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the suffix is kept: some writers (mx.save_safetensors) append theirs otherwise
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda p: Path(p).write_text(text))


def write_json(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (``str()`` for unknown types)."""
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def check_destination(dest: PathLike, force: bool, force_hint: str = "force=True") -> None:
    """Refuse an existing non-empty destination unless ``force``."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest} exists and is not a folder; choose another output path")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise ValueError(f"{dest} already exists and is not empty; pass {force_hint} to replace it or choose another path")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but is not ours, or we cannot tell
    return True


def _is_stale(folder: Path, max_age: float) -> bool:
    """A build folder is stale when its writer (``OWNER_FILE``) is a dead process on this host, or,
    owner unknown (another host, an older version), when untouched for ``max_age`` seconds."""
    try:
        host, pid = (folder / OWNER_FILE).read_text().split()
        if host == socket.gethostname():
            return int(pid) != os.getpid() and not _pid_alive(int(pid))
    except (OSError, ValueError):
        pass
    return time.time() - folder.stat().st_mtime > max_age


def remove_stale_partials(parent: PathLike, name: str, max_age: float = STALE_SECONDS) -> int:
    """Delete hidden ``.<name>.partial-*`` folders in ``parent`` left by a killed writer (see
    ``_is_stale``); folders of a live writer are kept. Returns how many were removed."""
    parent = Path(parent)
    if not parent.is_dir():
        return 0
    removed = 0
    for p in parent.glob(f".{name}{PARTIAL_TAG}*"):
        try:
            if p.is_dir() and _is_stale(p, max_age):
                shutil.rmtree(p)
                removed += 1
        except OSError:
            continue
    return removed


@contextmanager
def atomic_folder(dest: PathLike, force: bool = False, on_replace: Optional[Callable[[Path], None]] = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``dest``; rename it to ``dest`` only if the block succeeds.

    On any failure the temporary folder (and parent folders created for it) are removed, so
    nothing half-written is left behind; build folders of killed writers (``kill -9``) are removed
    by the next write to the same place (``remove_stale_partials``). ``on_replace(dest)`` may veto replacing an existing
    folder (raise) before anything is touched.
    """
    dest = Path(dest).absolute()
    check_destination(dest, force)
    if dest.exists() and on_replace is not None:
        on_replace(dest)
    created = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(dest.parent, dest.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}{PARTIAL_TAG}", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)
        (tmp / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        yield tmp
        (tmp / OWNER_FILE).unlink(missing_ok=True)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # deepest first
            try:
                p.rmdir()
            except OSError:
                break
        raise


def read_recipe(path: PathLike, allowed) -> dict:
    """A recipe YAML as {option: value}; unknown keys are refused (they would be silently ignored)."""
    import yaml

    try:
        recipe = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise FileNotFoundError(f"cannot read the recipe {path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML ({first_line(e)})") from e
    if not isinstance(recipe, dict):
        raise ValueError(f"{path} must be a mapping of option: value")
    unknown = sorted(set(recipe) - set(allowed))
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    return recipe
