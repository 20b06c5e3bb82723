"""Atomic checkpoints: a killed save never spoils the previous checkpoint.

Layout under a checkpoint root:

    root/
      latest                 name of the newest complete checkpoint (a hint; the scan decides)
      step_00000012/
        manifest.json        written last: step, plan, world size, size + sha256 of every file
        trainer.pt           replicated state (model, optimizer, scheduler, sampler, counters), rank 0 only
        rng_rank00000.pt     per-rank RNG states (torch, numpy, python)
        deepspeed/           DeepSpeed's own sharded files, when the DeepSpeed trainer saves
      .tmp-step_00000012/    a save in progress (or one that was killed): never read

A save writes everything into `.tmp-step_N`, fsyncs, writes the manifest, renames the
directory to `step_N` (atomic), then updates `latest`. Loading verifies sizes and hashes
against the manifest, so a truncated or corrupted file is named in the error, and
`latest_checkpoint` falls back to the newest checkpoint that verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.atomic import remove_stale_temps, write_json_atomic, write_text_atomic
from launcher.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_FILE = "trainer.pt"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete or corrupted; the message names the file."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file_name(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


# --------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -------------------------------------------------------------------------- save
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj: Any, path: Path) -> None:
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    state: dict[str, Any] | None,
    *,
    rank: int = 0,
    world_size: int = 1,
    plan: Any = None,
    rank_state: dict[str, Any] | None = None,
    barrier: Callable[[], None] | None = None,
    keep_last: int | None = None,
    write_extra: Callable[[Path], None] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` atomically; every rank calls it, with the same arguments.

    Rank 0 writes the replicated `state`; every rank writes its `rank_state` (RNG) and
    runs `write_extra(tmp_dir)` (the DeepSpeed engine's own sharded save). `barrier` is the
    process group's barrier (None with one process).
    """
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    sync = barrier or (lambda: None)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):  # left by a save that was killed
            shutil.rmtree(stale)
        remove_stale_temps(root / "latest")  # `.latest.*.tmp`, from a kill while writing `latest`
        tmp.mkdir()
    sync()
    if rank_state is not None:
        _torch_save(rank_state, tmp / rank_file_name(rank))
    if write_extra is not None:
        write_extra(tmp)
    if rank == 0 and state is not None:
        _torch_save(state, tmp / STATE_FILE)
    sync()
    if rank == 0:
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            files[str(path.relative_to(tmp))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "world_size": world_size,
            "plan": None if plan is None else plan.to_dict(),
            "files": files,
            "created": time.time(),
            **(meta or {}),
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (a resumed run): replace it whole
            trash = root / f".trash-{step_dir_name(step)}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        write_text_atomic(root / "latest", final.name + "\n")
        if keep_last:
            for old in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    sync()
    return final


# -------------------------------------------------------------------------- load
def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Finished checkpoint directories (renamed into place), oldest first; not verified."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_path} is missing: {path} is not a complete checkpoint") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{manifest_path} cannot be read ({e}): the checkpoint is corrupted") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path} has format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
    return manifest


def verify_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest or raise naming the bad file."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing from checkpoint {path}")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{file} is truncated or altered: {size} bytes, the manifest says {expected['size']}")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file} is corrupted: its sha256 differs from the manifest's")
    return manifest


def latest_checkpoint(root: str | os.PathLike[str], *, start_over_if_corrupt: bool = False) -> Path | None:
    """The newest checkpoint under `root` that verifies; warns about newer ones that do not.

    None when there is no checkpoint yet (a first start). When checkpoints exist but none
    verifies, starting at step 0 would silently throw the run away: CheckpointError listing
    each one and why, unless `start_over_if_corrupt` (then a warning per checkpoint, None).
    """
    damaged: list[str] = []
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            damaged.append(f"{path.name}: {e}")
            continue
        for why in damaged:
            warnings.warn(f"skipping checkpoint {why}", stacklevel=2)
        return path
    if damaged and not start_over_if_corrupt:
        raise CheckpointError(
            f"{root} holds {len(damaged)} checkpoint(s) and none can be loaded: {'; '.join(damaged)}. "
            "Repair or move them away to resume, or pass --start-over-if-corrupt to start again at step 0"
        )
    for why in damaged:
        warnings.warn(f"skipping checkpoint {why}; none is left: starting over at step 0", stacklevel=2)
    return None


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory, or a root whose newest complete checkpoint is taken."""
    path = Path(path)
    if (path / MANIFEST).exists() or _STEP_DIR.match(path.name):
        verify_checkpoint(path)
        return path
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"no complete checkpoint under {path}")
    return found


def load_checkpoint(
    path: str | os.PathLike[str], rank: int | None = None, verify: bool = True
) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """(replicated state, this rank's RNG state or None, manifest) from checkpoint `path`."""
    import torch

    path = Path(path)
    manifest = verify_checkpoint(path) if verify else read_manifest(path)
    state_path = path / STATE_FILE

    def load(file: Path) -> Any:
        try:
            return torch.load(file, map_location="cpu", weights_only=False)
        except Exception as e:  # torch raises several types for a damaged zip
            raise CheckpointError(f"{file} cannot be loaded: {e}") from None

    state = load(state_path) if state_path.exists() else {}
    rank_state = None
    if rank is not None and (path / rank_file_name(rank)).exists():
        rank_state = load(path / rank_file_name(rank))
    return state, rank_state, manifest


def inspect_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What `gradaccum checkpoint inspect` shows: step, plan, world size, completeness."""
    path = Path(path)
    info: dict[str, Any] = {"path": str(path)}
    try:
        manifest = verify_checkpoint(path)
    except CheckpointError as e:
        info.update(complete=False, error=str(e))
        try:
            manifest = read_manifest(path)
        except CheckpointError:
            return info
    else:
        info["complete"] = True
    info.update(
        step=manifest["step"],
        world_size=manifest["world_size"],
        plan=manifest["plan"],
        files=len(manifest["files"]),
        bytes=sum(f["size"] for f in manifest["files"].values()),
    )
    for key in ("backend", "samples_consumed"):
        if key in manifest:
            info[key] = manifest[key]
    return info
