"""deepspeed: DeepSpeed's own launcher (`deepspeed` / `deepspeed.launcher.runner`).

The workers get the DeepSpeed JSON rendered from the plan ($GRADACCUM_DEEPSPEED_CONFIG,
deepspeed.json in the run directory). Inside an sbatch script it runs `--launcher slurm`
from the batch node, which starts one srun task per process over a hostfile of the job.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from launcher.backends.base import (
    DEEPSPEED_CONFIG_ENV_VAR,
    Backend,
    CommandError,
    Flag,
    JobValue,
    Launch,
    RunFile,
    check_port,
    check_positive,
    program,
    safe_path,
    sh,
)
from launcher.hostfile import validate_hostname

if TYPE_CHECKING:
    from launcher.plan import BatchPlan
    from launcher.slurm import SlurmJob

#: DeepSpeed's multi-node backends (its `--launcher`).
DEEPSPEED_LAUNCHERS = ("pdsh", "openmpi", "slurm")


def deepspeed_argv(
    script: str,
    script_args: Sequence[str] = (),
    *,
    hostfile: str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    num_nodes: int | None = None,
    num_gpus: int | None = None,
    master_addr: str | None = None,
    master_port: int | str | None = None,
    launcher: str | None = None,
    single_host: bool = False,
    force_multi: bool = False,
    launcher_args: str | None = None,
    program: Sequence[str] = ("deepspeed",),
) -> list[str]:
    """argv for DeepSpeed's `deepspeed` launcher (it adds `--local_rank=N` to the script).

    On a machine without GPUs it starts one process unless `num_gpus` says how many.
    `single_host`: the hostfile names only this machine; skip DeepSpeed's ssh check.
    `hostfile`, `master_addr` and `master_port` may be JobValues (shell text in the job).
    """
    check_positive(num_nodes, "--num_nodes")
    check_positive(num_gpus, "--num_gpus")
    if not isinstance(master_port, JobValue):
        check_port(master_port, "--master_port")
    if include and exclude:
        raise CommandError("--include and --exclude cannot be combined; give one of them")
    if (include or exclude) and (num_nodes or num_gpus):
        raise CommandError("DeepSpeed does not accept --num_nodes/--num_gpus together with --include/--exclude")
    if launcher is not None and launcher not in DEEPSPEED_LAUNCHERS:
        raise CommandError(f"deepspeed --launcher must be one of {', '.join(DEEPSPEED_LAUNCHERS)}, got {launcher!r}")
    argv = [*program]
    if hostfile:
        argv += ["--hostfile", hostfile if isinstance(hostfile, JobValue) else safe_path(hostfile)]
        if single_host:
            argv.append("--no_ssh_check")
    if include:
        argv += ["--include", include]
    if exclude:
        argv += ["--exclude", exclude]
    if num_nodes:
        argv += ["--num_nodes", str(num_nodes)]
    if num_gpus:
        argv += ["--num_gpus", str(num_gpus)]
    if master_addr:
        # Without it and with a hostfile, DeepSpeed asks the first host over ssh.
        addr = master_addr if isinstance(master_addr, JobValue) else validate_hostname(master_addr, "--master_addr")
        argv += ["--master_addr", addr]
    if master_port is not None:
        argv += ["--master_port", master_port if isinstance(master_port, JobValue) else str(master_port)]
    if launcher:
        argv += ["--launcher", launcher]
    if force_multi:
        argv.append("--force_multi")
    if launcher_args:
        argv.append(f"--launcher_args={launcher_args}")
    return [*argv, safe_path(script), *script_args]


_SBATCH_BLOCK = """\
# DeepSpeed's own Slurm launcher: from this node it runs `srun -n WORLD`, one task per process,
# over a hostfile written here from the job's node list ({nproc} slot(s) per node).
# Ranks come from SLURM_PROCID (launcher.env); MASTER_ADDR/MASTER_PORT from above.
export GRADACCUM_DEEPSPEED_CONFIG=$RUN_DIR/deepspeed.json
cat >"$GRADACCUM_DEEPSPEED_CONFIG.$SLURM_JOB_ID.tmp" <<'GRADACCUM_JSON'
{config}
GRADACCUM_JSON
mv -f "$GRADACCUM_DEEPSPEED_CONFIG.$SLURM_JOB_ID.tmp" "$GRADACCUM_DEEPSPEED_CONFIG"
hostfile=$RUN_DIR/hostfile.$SLURM_JOB_ID
"$PYTHON" -m launcher.slurm_job hostfile --slots {nproc} --output "$hostfile"
{command}"""


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    description = "DeepSpeed's launcher (pdsh, openmpi or slurm across nodes)"
    flags = (
        Flag("--deepspeed-launcher", dict(choices=DEEPSPEED_LAUNCHERS, help="deepspeed multi-node backend")),
        Flag("--zero-stage", dict(type=int, choices=(0, 1, 2, 3), help="deepspeed: ZeRO stage in the JSON")),
        Flag("--deepspeed-base", dict(metavar="FILE", help="deepspeed: a JSON to merge (batch keys must agree)")),
    )
    takes_hostfile = True
    sbatch_description = "deepspeed --launcher slurm"

    def run_files(self, plan: BatchPlan, launch: Launch) -> list[RunFile]:
        from launcher.configs import deepspeed_config, load_json_file

        base_path = launch.options.get("deepspeed_base")
        base = load_json_file(base_path, "base DeepSpeed config") if base_path else None
        config = deepspeed_config(plan, base, zero_stage=launch.options.get("zero_stage"))
        return [RunFile("deepspeed.json", config, DEEPSPEED_CONFIG_ENV_VAR)]

    def argv(self, launch: Launch, env: Mapping[str, str]) -> list[str]:
        return deepspeed_argv(
            launch.script,
            launch.script_args,
            hostfile=launch.hostfile,
            include=launch.include,
            exclude=launch.exclude,
            num_nodes=None if launch.hosts or launch.nodes[1] == 1 else launch.nodes[1],
            num_gpus=None if launch.hosts else launch.nproc_per_node,
            master_addr=launch.master_addr,
            master_port=launch.master_port,
            launcher=launch.options.get("deepspeed_launcher"),
            single_host=launch.single_host,
            program=program("deepspeed", python=launch.python),
        )

    def sbatch_block(self, job: SlurmJob, plan: BatchPlan, script: str, script_args: Sequence[str]) -> str:
        from launcher.configs import deepspeed_config

        run = deepspeed_argv(
            script,
            script_args,
            hostfile=JobValue('"$hostfile"'),
            single_host=True,  # adds --no_ssh_check: srun starts the workers, not ssh
            master_addr=JobValue('"$MASTER_ADDR"'),
            master_port=JobValue('"$MASTER_PORT"'),
            launcher="slurm",
            # Without --force_multi a one-node hostfile makes DeepSpeed spawn the workers itself,
            # outside any job step, where the forwarded USR1 would not reach them.
            force_multi=True,
            # One failed rank ends the step instead of leaving the others in a collective.
            launcher_args="--kill-on-bad-exit=1",
            program=(JobValue('"$PYTHON"'), "-m", "deepspeed.launcher.runner"),
        )
        tail = len(script_args) + 1
        config = json.dumps(deepspeed_config(plan, zero_stage=job.zero_stage), indent=2, sort_keys=True)
        command = f"{sh(run[:-tail])} \\\n  {sh(run[-tail:])}"
        return _SBATCH_BLOCK.format(nproc=job.nproc_per_node, config=config, command=command)
