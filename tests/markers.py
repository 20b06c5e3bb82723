"""Marks for parametrized cases that start a launcher: `pytest.param(name, marks=...)` with
the marker of the tool the case needs (see tests/test_markers.py)."""

from __future__ import annotations

import re

import pytest

#: a word in the case's name -> the marker of what that case runs
TOOL_MARKS = {"mpirun": pytest.mark.mpi, "srun": pytest.mark.slurm, "deepspeed": pytest.mark.deepspeed}


def by_tool(names) -> list:
    """`names` as parameters, each marked for the tools its name mentions ("launch_mpirun_hostfile": mpi)."""
    return [
        pytest.param(name, marks=[mark for tool, mark in TOOL_MARKS.items() if tool in re.split(r"[^a-z]+", name)])
        for name in names
    ]
