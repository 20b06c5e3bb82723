"""Write files so that a reader never sees half of one (temp name, fsync, rename); read JSON with clear errors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from launcher.errors import UserError


def write_text_atomic(path: str | os.PathLike[str], text: str, mode: int | None = None) -> Path:
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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
