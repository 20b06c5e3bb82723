"""Process-group set-up for the trainers: whoever launched us, one call, checked against the plan.

`launcher.env` knows torchrun, the deepspeed launcher, `gradaccum launch`, OpenMPI, MPICH
and Slurm; it writes the torch.distributed variables so that `init_method="env://"` works
under mpirun and srun too. The world size is checked against the plan twice: from the
environment *before* the rendezvous (a rendezvous for ranks that never come would hang),
and from the live group after it.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys

import torch
import torch.distributed as dist

from launcher.errors import UserError
from launcher.plan import BatchPlan


class WorldSizeMismatch(UserError):
    """The live process group does not have the number of processes the plan was made for."""


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    launcher: str | None = None


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def mismatch_message(plan: BatchPlan, live: int, launcher: str | None) -> str:
    who = f"the {launcher} launcher" if launcher else "no launcher (a single process)"
    return (
        f"the batch plan was made for world size {plan.world_size} (global {plan.global_batch_size} = micro "
        f"{plan.micro_batch_size} × accumulation {plan.gradient_accumulation_steps} × data-parallel "
        f"{plan.data_parallel_size}) but {who} started {live} process(es). Usual causes: mpirun/srun without "
        "the rank variables reaching the script (every rank then thinks it is alone: start it through "
        "`gradaccum launch` or export WORLD_SIZE/RANK), --nproc-per-node or --nnodes not matching the plan, "
        "or a stale $GRADACCUM_PLAN. Start that many processes, or re-plan for the live world size "
        f"(e.g. `gradaccum plan --global-batch-size {plan.global_batch_size} --world-size {live}`)."
    )


#: who started us, as detected by the call that initialised the group
_launcher: str | None = None


def _detect() -> tuple[int, str | None]:
    """(world size, launcher name) from the environment; exports the torch variables."""
    try:
        from launcher import env as launcher_env
    except ImportError:  # launcher.env not installed: torchrun's variables only
        return int(os.environ.get("WORLD_SIZE", "1")), ("env" if "RANK" in os.environ else None)
    found = launcher_env.detect()
    if found.launcher is not None:
        launcher_env.export_torch_distributed_env()
    return found.world_size, found.launcher


def init_distributed(
    plan: BatchPlan | None = None, backend: str | None = None, timeout_s: float | None = None
) -> DistInfo:
    """Initialise torch.distributed once (no-op when already done) and check the world size."""
    global _launcher
    if not dist.is_initialized():
        world, _launcher = _detect()
        if plan is not None and world != plan.world_size:
            raise WorldSizeMismatch(mismatch_message(plan, world, _launcher))
        backend = backend or default_backend()
        kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        if _launcher is None and world == 1:
            # A plain `python script.py`: a private in-memory store, no port to collide on.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
        else:
            dist.init_process_group(backend, init_method="env://", **kwargs)
    live = dist.get_world_size()
    if plan is not None and live != plan.world_size:
        raise WorldSizeMismatch(mismatch_message(plan, live, _launcher))
    backend = dist.get_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), live, local_rank, backend, device, _launcher)


def shutdown(barrier: bool = False) -> None:
    """Destroy the process group; with `barrier`, first wait until every rank gets here.

    The barrier is for the success path: a rank that tears down its gloo connections while
    another is still writing its last files can make that rank abort at exit ("terminate
    called without an active exception", seen about 1 run in 3 here). Never barrier on an
    error path: the other ranks may be gone.
    """
    if not dist.is_initialized():
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


def log_rank0(message: str) -> None:
    """Print on rank 0 only (stderr: stdout may be reserved for JSON)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, file=sys.stderr, flush=True)
