"""launcher.env: detection tables per launcher, the order between them, purity, export,
and Slurm node-list expansion by Slurm itself against python-hostlist."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from unittest import mock

import pytest

from launcher import env as cenv
from launcher.env import ClusterEnv, EnvError, detect, expand_nodelist, export_torch_distributed_env
from tests.conftest import run_cli

TORCHRUN = {
    "RANK": "3",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "4",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29400",
    "TORCHELASTIC_RUN_ID": "job7",
    "TORCHELASTIC_RESTART_COUNT": "2",
}
OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "5",
    "OMPI_COMM_WORLD_SIZE": "8",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    "OMPI_COMM_WORLD_NODE_RANK": "1",  # the rank among processes on the node, not the node index
    "OMPI_MCA_ess_base_jobid": "2065760257",
}
MPICH = {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1"}
SLURM_BATCH = {
    "SLURM_JOB_ID": "1234",
    "SLURM_JOB_NODELIST": "node[01-02]",
    "SLURM_NTASKS": "4",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}
SLURM_TASK = {
    **SLURM_BATCH,
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_NODELIST": "node[01-02]",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
}
DEEPSPEED = {
    "RANK": "1",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_SIZE": "2",
    "CROSS_RANK": "0",
    "CROSS_SIZE": "1",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29501",
}
LOCAL = {
    "RANK": "1",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29502",
    "GRADACCUM_LAUNCHER": "local",
}


def _expect(launcher, rank, local_rank, world, local_world, node_rank, addr, port, hosts=(), restarts=0):
    return ClusterEnv(launcher, rank, local_rank, world, local_world, node_rank, addr, port, tuple(hosts), restarts)


# One row per launcher, and the combinations that decide the order (outer launchers'
# variables leak into inner ones).
CASES = {
    "nothing": ({}, _expect(None, 0, 0, 1, 1, 0, "127.0.0.1", 29500)),
    "torchrun": (TORCHRUN, _expect("torchrun", 3, 1, 4, 2, 1, "10.0.0.1", 29400, restarts=2)),
    "deepspeed": (DEEPSPEED, _expect("deepspeed", 1, 1, 2, 2, 0, "127.0.0.1", 29501)),
    "local": (LOCAL, _expect("local", 1, 1, 2, 2, 0, "127.0.0.1", 29502)),
    "plain env://": (
        {"RANK": "1", "WORLD_SIZE": "2"},
        _expect("env", 1, 1, 2, 2, 0, "127.0.0.1", 29500),
    ),
    "openmpi": (OPENMPI, _expect("openmpi", 5, 1, 8, 4, 1, "127.0.0.1", 20000 + 2065760257 % 10000)),
    "openmpi + MASTER_*": (
        {**OPENMPI, "MASTER_ADDR": "head", "MASTER_PORT": "1234"},
        _expect("openmpi", 5, 1, 8, 4, 1, "head", 1234),
    ),
    "mpich": (MPICH, _expect("mpich", 2, 0, 3, 1, 2, "127.0.0.1", 29500)),
    "slurm task": (
        SLURM_TASK,
        _expect("slurm", 3, 1, 4, 2, 1, "node01", 21234, ("node01", "node02")),
    ),
    "slurm batch step is one process": (
        SLURM_BATCH,
        _expect("slurm", 0, 0, 1, 1, 0, "node01", 21234, ("node01", "node02")),
    ),
    "slurm uneven tasks per node": (
        {**SLURM_TASK, "SLURM_STEP_TASKS_PER_NODE": "3,1", "SLURM_PROCID": "3", "SLURM_LOCALID": "0"},
        _expect("slurm", 3, 0, 4, 1, 1, "node01", 21234, ("node01", "node02")),
    ),
    "slurm ntasks-per-node": (
        {**SLURM_TASK, "SLURM_NTASKS_PER_NODE": "2", "SLURM_STEP_TASKS_PER_NODE": "junk"},
        _expect("slurm", 3, 1, 4, 2, 1, "node01", 21234, ("node01", "node02")),
    ),
    # mpirun inside an sbatch job: every rank inherits SLURM_PROCID=0 (measured).
    "mpirun inside sbatch": (
        {**SLURM_BATCH, **OPENMPI},
        _expect("openmpi", 5, 1, 8, 4, 1, "node01", 20000 + 2065760257 % 10000, ("node01", "node02")),
    ),
    "mpich inside sbatch": (
        {**SLURM_BATCH, **MPICH},
        _expect("mpich", 2, 0, 3, 1, 2, "node01", 21234, ("node01", "node02")),
    ),
    # torchrun started by srun: torchrun's variables are per worker, Slurm's per node.
    "torchrun inside srun": (
        {**SLURM_TASK, **TORCHRUN},
        _expect("torchrun", 3, 1, 4, 2, 1, "10.0.0.1", 29400, ("node01", "node02"), 2),
    ),
    "torchrun inside mpirun": (
        {**OPENMPI, **TORCHRUN},
        _expect("torchrun", 3, 1, 4, 2, 1, "10.0.0.1", 29400, restarts=2),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_detect_table(name):
    environ, expected = CASES[name]
    with mock.patch.dict(os.environ, environ, clear=True):
        # no SLURM_CONF / scontrol config in the cleared environment: python-hostlist expands
        with mock.patch.object(cenv, "slurm_configured", return_value=False):
            assert detect(use_mpi4py=False) == expected
            assert dict(os.environ) == environ, "detect() must not write the environment"
    with mock.patch.object(cenv, "slurm_configured", return_value=False):
        assert detect(dict(environ), use_mpi4py=False) == expected


def test_detection_order_is_innermost_first():
    order = cenv.DETECTION_ORDER
    assert order.index("torchrun") < order.index("openmpi") < order.index("mpich") < order.index("slurm")
    assert order.index("slurm") < order.index("mpi4py") < order.index(None)


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is outside world size 2"),
        ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, "exceeds"),
        ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "70000"}, "not a TCP port"),
        ({**SLURM_TASK, "SLURM_STEP_TASKS_PER_NODE": "2(x"}, "cannot parse Slurm tasks-per-node"),
        ({**SLURM_TASK, "SLURM_NODEID": "5"}, "SLURM_NODEID=5"),
    ],
)
def test_detect_rejects_inconsistent_environment(environ, message):
    with mock.patch.object(cenv, "slurm_configured", return_value=False):
        with pytest.raises(EnvError, match=message):
            detect(environ, use_mpi4py=False)


@pytest.mark.parametrize("spec, expected", [("2(x3),1", [2, 2, 2, 1]), ("4", [4]), ("1,2(x2)", [1, 2, 2])])
def test_tasks_per_node(spec, expected):
    assert cenv.tasks_per_node(spec) == expected


def test_export_writes_exactly_the_torch_variables_and_detects_the_same_again():
    before = {**OPENMPI, "MASTER_ADDR": "head", "MASTER_PORT": "1234"}
    environ = dict(before)
    found = export_torch_distributed_env(environ)
    assert found.launcher == "openmpi"
    assert {k: v for k, v in environ.items() if k not in before} == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "GRADACCUM_LAUNCHER": "openmpi",
    }
    assert detect(environ, use_mpi4py=False) == found


def test_export_refuses_multi_node_without_master_address():
    with pytest.raises(EnvError, match="set MASTER_ADDR"):
        export_torch_distributed_env(dict(OPENMPI))


def test_torch_distributed_env_is_what_env_init_needs():
    got = cenv.torch_distributed_env(CASES["slurm task"][1])
    assert got == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node01",
        "MASTER_PORT": "21234",
    }


def test_slurm_jobs_on_one_node_get_different_ports():
    ports = {detect({**SLURM_TASK, "SLURM_JOB_ID": str(job)}).master_port for job in (1234, 1235, 98765)}
    assert len(ports) == 3


# ------------------------------------------------------------------- node lists
TRICKY = [
    ("node[01-03,7]", ["node01", "node02", "node03", "node7"]),
    ("rack[1-2]-n[9-10]", ["rack1-n9", "rack1-n10", "rack2-n9", "rack2-n10"]),
    ("node[01-03,7],x[001-002]", ["node01", "node02", "node03", "node7", "x001", "x002"]),
    ("n[1-3,05]", ["n1", "n2", "n3", "n05"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("node[1-2],node[2-3]", ["node1", "node2", "node2", "node3"]),
    ("gpu-a[1-2]-ib[1]", ["gpu-a1-ib1", "gpu-a2-ib1"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("single", ["single"]),
    ("a,b c", ["a", "b", "c"]),
]


@pytest.fixture(scope="module")
def slurm_conf(tmp_path_factory):
    """The smallest slurm.conf that `scontrol show hostnames` needs (no daemons)."""
    if shutil.which("scontrol") is None:
        pytest.fail("scontrol is missing: install slurm-wlm (make os-deps)")
    path = tmp_path_factory.mktemp("slurm") / "slurm.conf"
    path.write_text(f"ClusterName=gradaccumtest\nSlurmctldHost={socket.gethostname().split('.')[0]}\n")
    return {"SLURM_CONF": str(path)}


@pytest.mark.parametrize("nodelist, expected", TRICKY)
@pytest.mark.slurm
def test_nodelist_scontrol_and_hostlist_agree(nodelist, expected, slurm_conf):
    assert expand_nodelist(nodelist, slurm_conf, method="scontrol") == expected
    assert expand_nodelist(nodelist, {}, method="hostlist") == expected
    assert expand_nodelist(nodelist, slurm_conf) == expected  # auto picks Slurm when configured


@pytest.mark.parametrize("nodelist", ["n[3-1]", "n[1-2", "n[a-b]"])
@pytest.mark.slurm
def test_invalid_nodelists_are_errors_with_both(nodelist, slurm_conf):
    # scontrol exits 0 for these and complains on stderr only; both paths must raise.
    with pytest.raises(EnvError):
        expand_nodelist(nodelist, slurm_conf, method="scontrol")
    with pytest.raises(EnvError):
        expand_nodelist(nodelist, {}, method="hostlist")


@pytest.mark.slurm
def test_where_slurm_and_hostlist_differ_slurm_decides(slurm_conf):
    # Slurm 22.05 rejects text after the last bracket; python-hostlist accepts it. When
    # Slurm is configured, `auto` follows Slurm, so jobs see what Slurm would run.
    assert expand_nodelist("gpu-a[1-2]-ib", {}, method="hostlist") == ["gpu-a1-ib", "gpu-a2-ib"]
    with pytest.raises(EnvError, match="scontrol cannot expand"):
        expand_nodelist("gpu-a[1-2]-ib", slurm_conf)


def test_nodelist_option_injection_is_refused():
    with pytest.raises(EnvError, match="starts with '-'"):
        expand_nodelist("--help", {}, method="scontrol")


# ------------------------------------------------------------------ the CLI
def test_cli_env_json_and_text():
    r = run_cli("env", "--json", env={"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert (got["launcher"], got["rank"], got["world_size"], got["local_world_size"]) == ("openmpi", 1, 2, 2)
    assert set(got) >= {"launcher", "rank", "local_rank", "world_size", "local_world_size", "node_rank"}
    assert set(got) >= {"master_addr", "master_port", "hosts"}
    r = run_cli("env", env={"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"})
    assert re.search(r"^launcher\s+openmpi$", r.stdout, re.M) and re.search(r"^rank\s+1$", r.stdout, re.M)


def test_cli_env_inconsistent_environment_exits_2():
    r = run_cli("env", "--json", env={"RANK": "5", "WORLD_SIZE": "2"})
    assert r.returncode == 2 and r.stdout == ""
    assert "rank 5 is outside world size 2" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------ issue 18: peers' data, half-set variables
@pytest.mark.slurm
def test_nodelist_accepts_whitespace_after_commas_inside_brackets(slurm_conf):
    # Lightning's test data: the first host of `1.2.3.[089, 100-110]` is 1.2.3.089.
    expected = ["1.2.3.089"] + [f"1.2.3.{n}" for n in range(100, 111)]
    assert expand_nodelist("1.2.3.[089, 100-110]", {}, method="hostlist") == expected
    assert expand_nodelist("1.2.3.[089, 100-110]", slurm_conf, method="scontrol") == expected
    assert expand_nodelist("n[1 ,2,  3]", {}, method="hostlist") == ["n1", "n2", "n3"]
    environ = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NODELIST": "1.2.3.[089, 100-110]"}
    with mock.patch.object(cenv, "slurm_configured", return_value=False):
        assert detect(environ, use_mpi4py=False).master_addr == "1.2.3.089"


@pytest.mark.parametrize(
    "nodelist, cause",
    [
        ("n[1 -3]", "space inside brackets (offset 3) that does not follow a comma"),
        ("n[1-2", "opens a '[' that is never closed"),
        ("n]1[", "']' with no '['"),
        ("n[[1]]", "nests a '['"),
    ],
)
def test_nodelist_errors_name_the_cause_that_is_there(nodelist, cause):
    with pytest.raises(EnvError) as e:
        expand_nodelist(nodelist, {}, method="hostlist")
    assert cause in str(e.value)


@pytest.mark.parametrize(
    "environ, present, missing",
    [
        ({"RANK": "1"}, "RANK", "WORLD_SIZE"),
        ({"WORLD_SIZE": "4"}, "WORLD_SIZE", "RANK"),
        ({"OMPI_COMM_WORLD_RANK": "1"}, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ({"PMI_RANK": "0"}, "PMI_RANK", "PMI_SIZE"),
        ({"PMI_SIZE": "2"}, "PMI_SIZE", "PMI_RANK"),
        (
            {"OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"},
            "OMPI_COMM_WORLD_SIZE and OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_RANK",
        ),
    ],
)
def test_half_set_launcher_variables_are_an_error_naming_what_is_missing(environ, present, missing):
    with pytest.raises(EnvError) as e:
        detect(environ, use_mpi4py=False)
    assert f"{present} {'are' if ' and ' in present else 'is'} set but {missing} is not" in str(e.value)


def test_a_complete_inner_launcher_still_wins_over_leftover_outer_variables():
    # Full OMPI_* with a stray LOCAL_RANK (left by an outer launcher) is still OpenMPI.
    assert detect({**OPENMPI, "LOCAL_RANK": "0"}, use_mpi4py=False).launcher == "openmpi"


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE is set but RANK is not"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be at least 1"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE='0' must be at least 1"),
        ({"RANK": "1"}, "RANK is set but WORLD_SIZE is not"),
    ],
)
def test_cli_env_bad_sizes_exit_2_without_traceback(environ, message):
    clean = {k: "" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    r = run_cli("env", env={**clean, **environ})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_local_variables_alone_are_left_to_the_mpi_library():
    # srun --mpi=pmix: no global OMPI rank or size; mpi4py answers, so no half-set error here.
    environ = {"OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert detect(environ, use_mpi4py=False).launcher is None
