"""Process-group set-up for the trainers: whoever launched us, one call, checked against the plan.

`launcher.env` knows torchrun, the deepspeed launcher, `gradaccum launch`, OpenMPI, MPICH
and Slurm; it writes the torch.distributed variables so that `init_method="env://"` works
under mpirun and srun too. The world size is checked against the plan twice: from the
environment *before* the rendezvous (a rendezvous for ranks that never come would hang),
and from the live group after it.

Hangs: `--collective-timeout` sets the process group's timeout (plus a grace period, so the
watchdog speaks first) and a `Watchdog` thread per rank that, when this rank made no progress
for that long, names the rank(s) the others are waiting for, the step and micro-step, and
exits non-zero so that torchrun or Slurm can restart or fail the job. Before the first step
`check_same_work` refuses to start ranks that disagree about the plan, the data or the steps.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

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
    plan: BatchPlan | None = None,
    backend: str | None = None,
    timeout_s: float | None = None,
    *,
    collective_timeout: float | None = None,
) -> DistInfo:
    """Initialise torch.distributed once (no-op when already done) and check the world size.

    `timeout_s` is the process group's timeout; `collective_timeout` (the watchdog's) sets
    it to `process_group_timeout(collective_timeout)` when `timeout_s` is not given. Every
    rank must arrive at the rendezvous within `collective_timeout` (else `timeout_s`, else
    DEFAULT_RENDEZVOUS_TIMEOUT_S), or each raises RendezvousTimeout naming who did not.
    """
    global _launcher
    if timeout_s is None and check_collective_timeout(collective_timeout) is not None:
        timeout_s = process_group_timeout(collective_timeout)
    if not dist.is_initialized():
        world, _launcher = _detect()
        if plan is not None and world != plan.world_size:
            raise WorldSizeMismatch(mismatch_message(plan, world, _launcher))
        backend = backend or default_backend()
        kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        if _launcher is None and world == 1:
            # A plain `python script.py`: a private in-memory store, no port to collide on.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
        else:  # env:// waits for a missing peer for 30 minutes in silence: a bounded rendezvous instead
            from trainers.rendezvous import env_endpoint, rendezvous

            rank, addr, port = env_endpoint()
            bound = collective_timeout or timeout_s or DEFAULT_RENDEZVOUS_TIMEOUT_S
            store = rendezvous(rank, world, addr, port, bound)
            store.set_timeout(kwargs.get("timeout", default_pg_timeout))  # what env:// would set
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, **kwargs)
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
    stop_watchdogs()  # the job is ending on purpose: waiting from here on is not a hang
    if not dist.is_initialized():
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


def exit_worker(status: int) -> None:
    """End a worker process now, skipping the interpreter's teardown.

    At teardown, C++ objects that still reference the destroyed process group (DDP's
    reducer, gloo's background threads) are destroyed in no fixed order, and now and then
    one aborts the process ("terminate called without an active exception", exit -6) after
    the work was done and saved: seen here in about 1 run of 10 even after a barrier and
    destroy_process_group. Everything a worker writes is written (atomically) before this.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def log_rank0(message: str) -> None:
    """Print on rank 0 only (stderr: stdout may be reserved for JSON)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ timeouts and hangs
#: default --collective-timeout: long enough for a slow step or a checkpoint, short enough
#: that a stuck job gives its allocation back within minutes
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0
#: how long a rank waits at the rendezvous for the others when no timeout is given
DEFAULT_RENDEZVOUS_TIMEOUT_S = DEFAULT_COLLECTIVE_TIMEOUT_S
#: exit status of a rank ended by the watchdog (as GNU timeout)
HANG_EXIT_STATUS = 124


class CollectiveTimeoutError(UserError):
    """A --collective-timeout that is not a positive number of seconds."""


def check_collective_timeout(seconds: float | None) -> float | None:
    if seconds is not None and not (seconds > 0 and seconds != float("inf")):
        raise CollectiveTimeoutError(
            f"--collective-timeout must be a positive number of seconds, got {seconds}; "
            f"the default is {DEFAULT_COLLECTIVE_TIMEOUT_S:g}"
        )
    return seconds


def process_group_timeout(collective_timeout_s: float) -> float:
    """The process group's own timeout: later than the watchdog's, as a backstop.

    The watchdog knows where every rank is and says so; a collective that times out only
    raises "timed out" on the ranks that waited. The backstop covers a rank whose watchdog
    thread cannot run (a C call holding the GIL).
    """
    return collective_timeout_s + max(10.0, 0.5 * collective_timeout_s)


PHASES = {
    "preflight": "preflight (ranks exchange plan, dataset length and steps)",
    "data": "collating its micro-batches (data loading)",
    "counts": "all-reduce of the token counts",
    "forward": "forward",
    "backward": "backward",
    "reduce": "fp32 gradient all-reduce",
    "totals": "all-reduce of loss and counts",
    "optimizer step": "optimizer step",
    "between steps": "between optimizer steps (code outside the trainer)",
}


def describe_position(pos: Mapping[str, Any]) -> str:
    phase = PHASES.get(pos.get("phase", ""), pos.get("phase", "?"))
    micro, k = pos.get("micro_step"), pos.get("micro_steps")
    if micro is None:
        return f"step {pos.get('step')}, {phase}"
    if pos.get("phase") == "backward" and k is not None and micro == k - 1:
        phase = "backward + gradient all-reduce"
    of = f"/{k}" if k else ""
    return f"step {pos.get('step')}, micro-step {micro + 1}{of}, {phase}"


def _ranks_text(ranks: Iterable[int]) -> str:
    ranks = sorted(ranks)
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def missing_ranks(
    positions: Mapping[int, Mapping[str, Any] | None], world_size: int, now: float, stale_s: float
) -> dict[int, str]:
    """rank -> why it counts as not arrived: behind the furthest rank, silent, or never seen."""
    seen = {r: p for r, p in positions.items() if p is not None}
    furthest = max(((p["step"], p["seq"]) for p in seen.values()), default=None)
    out = {}
    for rank in range(world_size):
        pos = seen.get(rank)
        if pos is None:
            out[rank] = "never reported (did it start? is it stuck before its first step?)"
            continue
        age = now - pos.get("time", now)
        where = describe_position(pos)
        if (pos["step"], pos["seq"]) < furthest:
            out[rank] = f"at {where}"
            if age > stale_s:
                out[rank] += f", silent for {age:.0f} s (process gone or frozen?)"
        elif age > stale_s:
            out[rank] = f"last heard {age:.0f} s ago at {where} (process gone or frozen?)"
    return out


def hang_report(
    rank: int,
    world_size: int,
    timeout_s: float,
    idle_s: float,
    me: Mapping[str, Any],
    positions: Mapping[int, Mapping[str, Any] | None] | None,
    now: float,
    stale_s: float,
) -> str:
    """The watchdog's message (pure: tested without processes)."""
    head = (
        f"gradaccum watchdog (rank {rank} of {world_size}, host {me.get('host', '?')}): no progress for "
        f"{idle_s:.1f} s (collective timeout {timeout_s:g} s) at {describe_position(me)}."
    )
    if positions is None:
        body = " The other ranks' positions could not be read (the rendezvous store is unreachable: rank 0 gone?)."
    else:
        missing = missing_ranks(positions, world_size, now, stale_s)
        if missing:
            body = (
                f" Rank(s) that did not arrive: {', '.join(map(str, sorted(missing)))} ("
                + "; ".join(f"rank {r} {why}" for r, why in sorted(missing.items()))
                + ")."
            )
            if rank in missing:
                body += " This rank is one of them: the others are waiting for it."
        else:
            body = (
                " Every rank reached the same point: the collective itself does not complete "
                "(network, or the communication library of some rank is stuck)."
            )
    tail = f" Exiting with status {HANG_EXIT_STATUS} so that the launcher can restart or fail the job."
    return head + body + tail


class Watchdog:
    """A thread that ends this rank when it made no progress for `timeout_s`.

    The training loop reports where it is (`progress`: a tuple assignment, free); the thread
    publishes that position in the rendezvous store every few seconds and, when it has not
    changed for `timeout_s`, reads every rank's position, prints which rank(s) the others are
    waiting for, and calls `os._exit`: the main thread may be stuck inside a collective or a
    data loader, where no exception can reach it.
    """

    def __init__(
        self,
        timeout_s: float,
        rank: int,
        world_size: int,
        store: Any,
        *,
        poll_s: float | None = None,
        exit_status: int = HANG_EXIT_STATUS,
    ) -> None:
        self.timeout_s, self.rank, self.world_size, self.store = timeout_s, rank, world_size, store
        self.poll_s = poll_s if poll_s is not None else min(max(timeout_s / 10, 0.1), 5.0)
        self.beat_s = max(self.poll_s, min(timeout_s / 4, 30.0))  # heartbeat when nothing changes
        self.stale_s = 2 * self.beat_s + self.poll_s + 1.0
        self.exit_status = exit_status
        self.host = socket.gethostname()
        self._state: dict[str, Any] = {"step": 0, "seq": 0, "micro_step": None, "phase": "preflight"}
        self._changed = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_process_group(cls, timeout_s: float | None) -> Watchdog | None:
        """A watchdog over the default group (None for one process or no timeout)."""
        if timeout_s is None or not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        store = dist.distributed_c10d._get_default_store()
        # a restarted job (torchrun --max-restarts) must not read the last attempt's positions
        prefix = f"gradaccum-watchdog/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        return cls(timeout_s, dist.get_rank(), dist.get_world_size(), dist.PrefixStore(prefix, store))

    def progress(self, step: int, micro_step: int | None, phase: str, micro_steps: int | None = None) -> None:
        # seq orders the positions inside a step; every rank runs the same sequence
        seq = self._state["seq"] + 1 if step == self._state["step"] else 0
        self._state = {"step": step, "seq": seq, "micro_step": micro_step, "micro_steps": micro_steps, "phase": phase}
        self._changed = time.monotonic()

    def start(self) -> Watchdog:
        if self._thread is None:
            self._changed = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="gradaccum-watchdog", daemon=True)
            self._thread.start()
            _watchdogs.add(self)
        return self

    def stop(self) -> None:
        self._stop.set()
        _watchdogs.discard(self)

    def _publish(self, state: dict[str, Any]) -> None:
        record = dict(state, time=time.time(), host=self.host, pid=os.getpid())
        self.store.set(f"rank/{self.rank}", json.dumps(record))

    def _read_positions(self) -> dict[int, dict[str, Any] | None] | None:
        try:
            out: dict[int, dict[str, Any] | None] = {}
            for r in range(self.world_size):
                key = f"rank/{r}"
                out[r] = json.loads(self.store.get(key)) if self.store.check([key]) else None
            return out
        except Exception:  # store gone with rank 0: say so rather than die silently
            return None

    def _run(self) -> None:
        published, last_beat = None, 0.0
        while not self._stop.wait(self.poll_s):
            state, idle = self._state, time.monotonic() - self._changed
            now = time.monotonic()
            if state is not published or now - last_beat >= self.beat_s:
                try:
                    self._publish(state)
                    published, last_beat = state, now
                except Exception:
                    pass  # the store may be briefly busy; the next poll retries
            if idle >= self.timeout_s and not self._stop.is_set():
                me = dict(state, host=self.host)
                message = hang_report(
                    self.rank,
                    self.world_size,
                    self.timeout_s,
                    idle,
                    me,
                    self._read_positions(),
                    time.time(),
                    self.stale_s,
                )
                print(message, file=sys.stderr, flush=True)
                os._exit(self.exit_status)


_watchdogs: set[Watchdog] = set()


def stop_watchdogs() -> None:
    for watchdog in list(_watchdogs):
        watchdog.stop()


# ------------------------------------------------------------------ same work everywhere
class WorkMismatch(UserError):
    """Ranks disagree about the plan, the dataset or the number of steps: they would hang."""


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def describe_mismatch(summaries: list[Mapping[str, Any]]) -> str | None:
    """None when every rank's summary is the same, else what differs on which ranks (pure)."""
    flat = [_flatten(s) for s in summaries]
    keys = sorted(set().union(*flat)) if flat else []
    lines = []
    for key in keys:
        by_value: dict[str, list[int]] = {}
        for rank, values in enumerate(flat):
            by_value.setdefault(json.dumps(values.get(key), sort_keys=True, default=str), []).append(rank)
        if len(by_value) > 1:
            parts = "; ".join(f"{v} on {_ranks_text(r)}" for v, r in sorted(by_value.items(), key=lambda i: i[1]))
            lines.append(f"  {key}: {parts}")
    if not lines:
        return None
    return (
        "the ranks disagree about the work they are about to do, so they would wait for each other "
        "forever (or train on mismatched data):\n" + "\n".join(lines) + "\n"
        "Every rank must get the same plan ($GRADACCUM_PLAN or the same batch flags), build the same "
        "dataset (no rank-dependent filtering or files), run the same number of steps and resume from "
        "the same checkpoint. Fix the rank(s) that differ and start again."
    )


def check_same_work(summary: Mapping[str, Any]) -> None:
    """Exchange `summary` once between all ranks; raise WorkMismatch on every rank if any differ."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(summary))
    message = describe_mismatch(gathered)
    if message:
        raise WorkMismatch(message)


class ReplicaDivergence(RuntimeError):
    """Data-parallel replicas that should hold identical parameters do not."""


def check_replicas(parameters: Iterable[torch.Tensor]) -> None:
    """All-gather a checksum of the parameters; raise naming the ranks that differ.

    After every optimizer step each data-parallel replica must hold bit-identical
    parameters (same reduced gradients, same decisions, such as skipping an fp16 step).
    """
    parameters = list(parameters)
    if not dist.is_initialized() or dist.get_world_size() == 1 or not parameters:
        return  # nothing replicated (a sharded backend gives none, on every rank)
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in parameters])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
    mine = [float(flat.sum()), float(flat.abs().sum()), float((flat * weights).sum())]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    groups: dict[tuple[float, ...], list[int]] = {}
    for rank, checksum in enumerate(gathered):
        groups.setdefault(tuple(checksum), []).append(rank)
    if len(groups) > 1:
        parts = "; ".join(_ranks_text(r) for r in sorted(groups.values()))
        raise ReplicaDivergence(f"data-parallel replicas hold different parameters: groups {parts}")
