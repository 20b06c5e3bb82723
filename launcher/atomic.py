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


def read_json(path: str | os.PathLike[str], what: str, error: type[UserError] = UserError) -> Any:
    """Parse a JSON file; an unreadable or invalid one raises `error` naming `what` and the path."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise error(f"cannot read {what} file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise error(f"{what} file {path} is not valid JSON: {e}") from None
