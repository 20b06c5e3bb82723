"""Write files so that a reader never sees half of one (temp name, fsync, rename); read JSON with clear errors."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from launcher.errors import UserError


class FileError(UserError):
    """A file or directory the user named cannot be read or written; says which and why."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _write_target(path: Path) -> Path:
    """The file a write to `path` must replace: a symlink's final target (so that
    `-o link.json` updates what the link points at and keeps the link), and never
    something other than a regular file (renaming over a FIFO or /dev/full would
    replace the node itself)."""
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as e:
        raise FileError(f"cannot write {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        via = f" (the target of the link {path})" if target != path else ""
        raise FileError(f"refusing to write {target}{via}: it is {_kind(mode)}; name a regular file")
    return target


def temp_glob(path: str | os.PathLike[str]) -> str:
    """The glob pattern of the temporary files `write_text_atomic(path)` makes next to it."""
    return f".{Path(path).name}.*.tmp"


def remove_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files a killed `write_text_atomic(path)` left next to `path`.

    Only for callers that are the sole writer of `path` at this moment (e.g. rank 0
    saving a checkpoint): another writer's temp file in flight would go too.
    Returns what was removed.
    """
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(temp_glob(path)):
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def make_dir(path: str | os.PathLike[str], what: str = "directory") -> Path:
    """Create `path` (and its parents) if missing; an existing file there, or a parent
    that cannot be created, is a FileError naming the path instead of a traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FileError(f"{what} {path} exists and is not a directory; name a directory or a new path") from None
    except OSError as e:
        raise FileError(f"cannot create {what} {path}: {e.strerror or e}") from None
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str, mode: int | None = None) -> Path:
    """Write `text` to `path` so that a reader sees the old file or the new one, never half.

    Through a symlink the link's target is written. A target that is not a regular file
    (directory, FIFO, device node) is refused; a missing directory or any other OS
    failure is a FileError naming the path (the temporary file is removed).
    """
    path = Path(path)
    target = _write_target(path)
    parent = target.parent if str(target.parent) else Path(".")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 if mode is None else mode)
        os.replace(tmp, target)
    except OSError as e:
        _discard(tmp)
        where = f"{target}, the target of the link {path}" if target != path else f"{path}"
        raise FileError(f"cannot write {where}: {e.strerror or e}") from None
    except BaseException:
        _discard(tmp)
        raise
    return path


def _discard(tmp: str | None) -> None:
    if tmp is not None and os.path.lexists(tmp):
        os.unlink(tmp)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def parse_json(text: str, source: str, error: type[UserError] = UserError) -> Any:
    """Parse JSON `text`; invalid JSON or a key given twice in one object raises `error`
    naming `source`. Duplicates are refused as DeepSpeed refuses them: with the standard
    parser the last value silently wins, which would overwrite e.g. a batch key unseen."""
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as e:
        raise error(f"{source} gives the key {e.key!r} more than once; keep one of them") from None
    except json.JSONDecodeError as e:
        raise error(f"{source} is not valid JSON: {e}") from None
    except RecursionError:
        raise error(f"{source} is nested too deeply to parse") from None


def read_json(path: str | os.PathLike[str], what: str, error: type[UserError] = UserError) -> Any:
    """Parse a JSON file; an unreadable, non-UTF-8 or invalid one, or one with a duplicate
    key, raises `error` naming `what` and the path. Every JSON file gradaccum reads comes
    through here (or through `parse_json`)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise error(f"cannot read {what} file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise error(
            f"{what} file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            "is it a binary file?"
        ) from None
    return parse_json(text, f"{what} file {path}", error)
