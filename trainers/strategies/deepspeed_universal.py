"""Resume a DeepSpeed ZeRO 1-3 checkpoint at another data-parallel size: DeepSpeed's universal checkpoint.

ZeRO 1-3 write optimizer state (and at stage 3 the parameters) in one file per
data-parallel rank, and `engine.load_checkpoint` refuses those at another data-parallel
size. DeepSpeed's converter (`python -m deepspeed.checkpoint.ds_to_universal`) rewrites them
as one file per parameter and state ("universal"), which an engine of any data-parallel size
loads when its config says `"checkpoint": {"load_universal": true}`.

Here: rank 0 converts `deepspeed/engine` into `deepspeed/engine_universal` inside the
gradaccum checkpoint (into a temporary name, renamed when complete: a killed conversion
leaves nothing that looks finished; a later resume reuses a finished one), the other ranks
wait; every rank then loads it with the engine's universal switch on for that one call.
Conversion failures name the reason and the way out (resume at the saved size).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist

from launcher.run import capture_command
from trainers.checkpoint import CheckpointError
from trainers.distributed import log_rank0

#: the converter's output, beside DeepSpeed's own files in the checkpoint's deepspeed/ directory
UNIVERSAL_SUFFIX = "_universal"
#: seconds the converter may take (it reads and rewrites the whole optimizer state once)
CONVERT_TIMEOUT_S = 3600.0


def converter_argv(source: Path, target: Path) -> list[str]:
    """`python -m deepspeed.checkpoint.ds_to_universal` for one checkpoint tag; one worker
    each (the machine is busy enough with our own ranks). `--inject_missing_state` converts
    checkpoints saved without `universal_checkpoint_info` (gradaccum before it wrote it)."""
    return [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(source),
        "--output_folder",
        str(target),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
        "--inject_missing_state",
    ]


def convert(directory: Path, tag: str) -> tuple[Path, str | None]:
    """Rank 0: `directory/tag` -> `directory/tag_universal` unless done before.
    Returns (the universal folder, the error message or None)."""
    source, target = directory / tag, directory / f"{tag}{UNIVERSAL_SUFFIX}"
    if target.is_dir():
        return target, None
    tmp = directory / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a conversion that was killed
    result = capture_command(converter_argv(source, tmp), timeout=CONVERT_TIMEOUT_S)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-6:])
        return target, f"DeepSpeed's ds_to_universal failed with status {result.returncode}:\n{tail}"
    tmp.rename(target)
    return target, None


def resume(engine: Any, directory: Path, tag: str, saved: Mapping[str, Any], data_parallel_size: int) -> None:
    """Every rank: convert (rank 0) and load the universal checkpoint of `directory/tag`."""
    stage, saved_dp = int(saved["zero_stage"]), int(saved["data_parallel_size"])
    way_out = f"resume with {saved_dp} data-parallel processes, the size it was written at"
    log_rank0(
        f"gradaccum: the DeepSpeed checkpoint holds ZeRO {stage} state partitioned over {saved_dp} data-parallel "
        f"ranks and this run has {data_parallel_size}: converting it to DeepSpeed's universal checkpoint "
        f"(ds_to_universal) in {directory / (tag + UNIVERSAL_SUFFIX)}"
    )
    answer: list[Any] = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        target, error = convert(directory, tag)
        answer = [(str(target), error)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(answer, src=0)
    target_name, error = answer[0]
    if error is not None:
        raise CheckpointError(
            f"cannot resume {directory.parent} at data-parallel size {data_parallel_size}: {error}\n"
            f"The way out: {way_out}"
        )
    config = engine._config  # the switch is read by load_checkpoint only; keep it off for later loads
    config.load_universal_checkpoint = True
    try:
        load_path, _ = engine.load_checkpoint(str(directory), tag=Path(target_name).name)
    except Exception as e:  # DeepSpeed raises assorted types for a universal load it cannot do
        raise CheckpointError(
            f"DeepSpeed could not load the universal checkpoint {target_name} at data-parallel size "
            f"{data_parallel_size} ({type(e).__name__}: {e}); the way out: {way_out}"
        ) from None
    finally:
        config.load_universal_checkpoint = False
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found nothing to load in {target_name}; the way out: {way_out}")
    log_rank0(f"gradaccum: loaded the universal checkpoint at data-parallel size {data_parallel_size}")
