"""A bounded rendezvous: every rank arrives within a deadline, or the job ends naming who did not.

torch's `env://` rendezvous waits for missing peers for the process group's timeout (30
minutes by default) without a word, then raises a bare DistNetworkError. Here each rank
connects to the store at MASTER_ADDR:MASTER_PORT (rank 0 hosts it, unless a torchrun agent
already does), writes one key saying it arrived, and waits for every rank's key until the
deadline. On time, the same store is handed to `init_process_group`; late, every rank that
is still there raises `RendezvousTimeout`, a UserError naming the ranks that never arrived
and the address and port it waited on (the worker start-up prints it as one line, exit 2).
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from typing import Any

import torch.distributed as dist

from launcher.errors import UserError


class RendezvousTimeout(UserError):
    """Some ranks never arrived at the rendezvous within its deadline."""


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _agent_store() -> bool:
    """A torchrun agent hosts the store (every worker is a client), as torch's env:// reads it."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"


def env_endpoint() -> tuple[int, str, int]:
    """(RANK, MASTER_ADDR, MASTER_PORT) from the environment, as env:// reads them."""
    values = {}
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        value = os.environ.get(name, "")
        if not value:
            raise UserError(f"{name} is not set: a launcher sets RANK, MASTER_ADDR and MASTER_PORT for every rank")
        values[name] = value
    try:
        port = int(values["MASTER_PORT"])
        rank = int(values["RANK"])
    except ValueError:
        raise UserError(
            f"RANK and MASTER_PORT must be integers, got {values['RANK']!r} and {values['MASTER_PORT']!r}"
        ) from None
    if not 0 < port < 65536:
        raise UserError(f"MASTER_PORT must be a port number (1-65535), got {port}")
    return rank, values["MASTER_ADDR"], port


def rendezvous(rank: int, world_size: int, addr: str, port: int, timeout_s: float) -> Any:
    """The store at `addr:port` once all `world_size` ranks arrived there; else RendezvousTimeout."""
    where = f"{addr}:{port}"
    hint = (
        "Check that every process was started (the launcher's output says which failed), that "
        "MASTER_ADDR/MASTER_PORT are the same for all and reachable from every node, and that no "
        "firewall blocks the port; a slow start can be given longer with --collective-timeout"
    )
    deadline = time.monotonic() + timeout_s
    host = rank == 0 and not _agent_store()
    if not host and not _listening(addr, port, deadline):  # polled here: torch's own retries log C++ traces
        raise RendezvousTimeout(
            f"rendezvous at {where}: rank {rank} of {world_size} waited {timeout_s:g} s but nobody answered "
            f"there: rank 0 never arrived (it hosts the rendezvous). {hint}"
        )
    try:
        store = dist.TCPStore(
            addr,
            port,
            world_size,
            is_master=host,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,  # the arrival keys below say who is missing
            multi_tenant=host,
        )
    except dist.DistNetworkError as e:
        if host:
            first = (str(e).strip().splitlines() or ["?"])[0][:200]
            raise RendezvousTimeout(
                f"rank 0 cannot host the rendezvous at {where} ({first}); is the port in use? Pick another MASTER_PORT"
            ) from None
        raise RendezvousTimeout(
            f"rendezvous at {where}: rank {rank} of {world_size} waited {timeout_s:g} s but nobody answered "
            f"there: rank 0 never arrived (it hosts the rendezvous). {hint}"
        ) from None
    # a torchrun that restarts its workers keeps its store: each attempt has its own keys
    prefix = f"gradaccum-rendezvous/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    store.set(f"{prefix}{rank}", f"{socket.gethostname()} pid {os.getpid()}")
    keys = [f"{prefix}{r}" for r in range(world_size)]
    # polled, not store.wait: a wait that times out logs C++ warnings; check never blocks
    try:
        while not store.check(keys):
            if time.monotonic() >= deadline:
                missing = [r for r in range(world_size) if not store.check([keys[r]])]
                raise RendezvousTimeout(
                    f"rendezvous at {where}: rank {rank} of {world_size} waited {timeout_s:g} s and "
                    f"{_ranks(missing)} never arrived. {hint}"
                )
            time.sleep(0.05)
    except dist.DistError:
        raise RendezvousTimeout(
            f"rendezvous at {where}: rank {rank} of {world_size} lost the rendezvous host (rank 0) while "
            f"waiting for the others. {hint}"
        ) from None
    return store


def _listening(addr: str, port: int, deadline: float) -> bool:
    """Does something accept connections at addr:port before `deadline`? (Polled from Python.)"""
    while True:
        try:
            with socket.create_connection((addr, port), timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
