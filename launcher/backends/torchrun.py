"""torchrun: one torchrun per node forks the node's workers; static or c10d rendezvous.

Under `gradaccum launch` it runs on this node (run it on every node of a static
multi-node job); inside an sbatch script srun starts one torchrun per node, which meet
at a c10d rendezvous on the first node.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from launcher.backends.base import (
    Backend,
    CommandError,
    Flag,
    JobValue,
    Launch,
    check_port,
    check_positive,
    parse_endpoint,
    parse_nnodes,
    program,
    safe_path,
    sh,
)
from launcher.backends.srun import srun_step
from launcher.hostfile import validate_hostname

if TYPE_CHECKING:
    from launcher.plan import BatchPlan
    from launcher.slurm import SlurmJob


def torchrun_argv(
    script: str,
    script_args: Sequence[str] = (),
    *,
    nproc_per_node: int,
    nnodes: int | str = 1,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    rdzv_backend: str = "c10d",
    max_restarts: int | None = None,
    program: Sequence[str] = ("torchrun",),
) -> list[str]:
    """torchrun argv for one node (run it on every node of a multi-node job).

    Static rendezvous: one node, or `nnodes` > 1 with `node_rank` and `master_addr`.
    Dynamic (c10d): `rdzv_endpoint` and `rdzv_id`; needed for elastic `nnodes="MIN:MAX"`
    and convenient under Slurm, where node ranks are not known in advance. `nnodes`,
    `rdzv_endpoint` and `rdzv_id` may be JobValues (shell text, checked in the job).
    """
    check_positive(nproc_per_node, "--nproc-per-node")
    low, high = (0, 0) if isinstance(nnodes, JobValue) else parse_nnodes(nnodes)
    check_port(master_port, "--master-port")
    argv = [*program, "--nnodes", nnodes if isinstance(nnodes, JobValue) else str(nnodes)]
    argv += ["--nproc-per-node", str(nproc_per_node)]
    if rdzv_endpoint or rdzv_id:
        if not (rdzv_endpoint and rdzv_id):
            raise CommandError("c10d rendezvous needs both --rdzv-endpoint HOST:PORT and --rdzv-id ID")
        if not isinstance(rdzv_id, JobValue) and not re.fullmatch(r"[A-Za-z0-9_.-]+", str(rdzv_id)):
            raise CommandError(f"--rdzv-id {rdzv_id!r}: use letters, digits, '_', '.', '-' (e.g. the Slurm job id)")
        if node_rank is not None or master_addr:
            raise CommandError("--node-rank / --master-addr are for static rendezvous; c10d assigns node ranks itself")
        if not isinstance(rdzv_endpoint, JobValue):
            parse_endpoint(rdzv_endpoint)
        argv += ["--rdzv-backend", rdzv_backend, "--rdzv-endpoint", rdzv_endpoint]
        argv += ["--rdzv-id", rdzv_id if isinstance(rdzv_id, JobValue) else str(rdzv_id)]
    else:
        if isinstance(nnodes, JobValue):
            raise CommandError("a node count known only in the job needs c10d rendezvous")
        if low != high:
            raise CommandError(f"elastic --nnodes {nnodes} needs c10d rendezvous: give --rdzv-endpoint and --rdzv-id")
        if high > 1 and (node_rank is None or not master_addr):
            raise CommandError(
                f"--nnodes {high} with static rendezvous needs --node-rank R and --master-addr HOST "
                "(the same on every node), or c10d rendezvous with --rdzv-endpoint and --rdzv-id"
            )
        if node_rank is not None:
            if not 0 <= node_rank < high:
                raise CommandError(f"--node-rank {node_rank} must be in 0..{high - 1}")
            argv += ["--node-rank", str(node_rank)]
        argv += ["--master-addr", validate_hostname(master_addr or "127.0.0.1", "--master-addr")]
        if master_port is not None:
            argv += ["--master-port", str(master_port)]
    if max_restarts is not None:
        if max_restarts < 0:
            raise CommandError(f"--max-restarts must be >= 0, got {max_restarts}")
        argv += ["--max-restarts", str(max_restarts)]
    return [*argv, safe_path(script), *script_args]


_RDZV = "rendezvous"

#: The sbatch block's comment: what keeps one torchrun per node from hanging.
_SBATCH_COMMENT = """\
# One srun task per node, each running torchrun with {nproc} process(es). What keeps this from hanging:
#  - exactly one torchrun per node (--ntasks-per-node=1) and --nnodes "$SLURM_NNODES";
#  - c10d rendezvous at the first node's NodeAddr (not its name) and a port free there;
#  - the same --rdzv-id on every node (the job id), and no --node-rank: torchrun assigns
#    node ranks itself, and they need not follow SLURM_NODEID.
# The task ignores USR1 so that torchrun outlives the forwarded signal (USR1 would kill it);
# its workers inherit the ignored USR1 until they install a handler, as the trainers do."""


class TorchrunBackend(Backend):
    name = "torchrun"
    description = "torchrun on this node (static or c10d rendezvous; elastic --nnodes MIN:MAX)"
    flags = (
        Flag("--node-rank", dict(type=int, metavar="R", help="torchrun static multi-node: this node's rank"), _RDZV),
        Flag("--rdzv-endpoint", dict(metavar="HOST:PORT", help="torchrun c10d rendezvous endpoint"), _RDZV),
        Flag("--rdzv-id", dict(metavar="ID", help="torchrun c10d rendezvous id (e.g. the Slurm job id)"), _RDZV),
        Flag("--max-restarts", dict(type=int, metavar="K", help="torchrun: restart the workers up to K times"), _RDZV),
    )
    elastic = True
    # torchrun sets MASTER_ADDR/MASTER_PORT in its workers from its own rendezvous.
    exports_master_addr = False
    exports_master_port = False
    sbatch_description = "one srun task per node running torchrun, c10d rendezvous"

    def picks_free_port(self, launch: Launch) -> bool:
        # Static multi-node torchrun needs the same port on every node (torchrun's default
        # then); c10d has its endpoint.
        return launch.nodes[1] == 1 and not launch.options.get("rdzv_endpoint")

    def env(self, launch: Launch, files) -> dict[str, str]:
        env = super().env(launch, files)
        if launch.options.get("max_restarts"):
            # Restarted workers otherwise reuse the failed attempt's rendezvous store and can
            # read dead workers' addresses ("Gloo connectFullMesh failed").
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        return env

    def argv(self, launch: Launch, env: Mapping[str, str]) -> list[str]:
        o = launch.options
        return torchrun_argv(
            launch.script,
            launch.script_args,
            nproc_per_node=launch.nproc_per_node,
            nnodes=launch.nnodes or 1,
            node_rank=o.get("node_rank"),
            master_addr=launch.master_addr if launch.master_addr_given and not o.get("rdzv_endpoint") else None,
            master_port=launch.master_port,
            rdzv_endpoint=o.get("rdzv_endpoint"),
            rdzv_id=o.get("rdzv_id"),
            max_restarts=o.get("max_restarts"),
            program=program("torchrun", "torch.distributed.run", launch.python),
        )

    def sbatch_tasks_per_node(self, job: SlurmJob) -> int:
        return 1  # torchrun forks the node's processes itself

    def sbatch_block(self, job: SlurmJob, plan: BatchPlan, script: str, script_args: Sequence[str]) -> str:
        run = torchrun_argv(
            script,
            script_args,
            nproc_per_node=job.nproc_per_node,
            nnodes=JobValue('"$SLURM_NNODES"'),
            rdzv_endpoint=JobValue('"$MASTER_ADDR:$MASTER_PORT"'),
            rdzv_id=JobValue('"$SLURM_JOB_ID"'),
            program=(JobValue('"$PYTHON"'), "-m", "torch.distributed.run"),
        )
        ignore_usr1 = ["bash", "-c", 'trap "" USR1; exec "$@"', "torchrun"]
        tail = len(script_args) + 1
        return (
            f"{_SBATCH_COMMENT.format(nproc=job.nproc_per_node)}\n"
            f"{sh(srun_step(job, 1))} \\\n  {sh(ignore_usr1)} \\\n  {sh(run[:-tail])} \\\n  {sh(run[-tail:])}"
        )
