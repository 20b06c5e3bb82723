"""BatchPlan: the triad solver, its errors and its alternatives."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher import BatchPlan, PlanError


def test_two_of_three_derive_the_third():
    p = BatchPlan.solve(96, 4, world_size=8)
    assert (p.global_batch_size, p.micro_batch_size, p.gradient_accumulation_steps) == (96, 4, 3)
    assert p.data_parallel_size == 8
    assert BatchPlan.solve(96, gradient_accumulation_steps=3, world_size=8).micro_batch_size == 4
    assert BatchPlan.solve(None, 4, 3, world_size=8).global_batch_size == 96
    assert BatchPlan.solve(96, 4, 3, world_size=8) == p


def test_global_alone_takes_accumulation_1_or_the_largest_micro_under_a_cap():
    p = BatchPlan.solve(64, world_size=4)
    assert (p.micro_batch_size, p.gradient_accumulation_steps) == (16, 1)
    p = BatchPlan.solve(96, world_size=4, max_micro_batch_size=5)
    assert (p.micro_batch_size, p.gradient_accumulation_steps) == (4, 6)
    p = BatchPlan.solve(28, world_size=2, max_micro_batch_size=5)  # 14 per rank: divisors 1, 2, 7, 14
    assert (p.micro_batch_size, p.gradient_accumulation_steps) == (2, 7)


def test_micro_alone_means_no_accumulation():
    p = BatchPlan.solve(micro_batch_size=8, world_size=4)
    assert (p.global_batch_size, p.gradient_accumulation_steps) == (32, 1)


def test_model_parallel_reduces_data_parallel():
    p = BatchPlan.solve(64, 4, world_size=8, model_parallel_size=2)
    assert p.data_parallel_size == 4 and p.gradient_accumulation_steps == 4


def test_indivisible_global_names_nearest_values_and_micro_divisors():
    with pytest.raises(PlanError) as e:
        BatchPlan.solve(30, 4, world_size=2)
    msg = str(e.value)
    assert "30" in msg and "micro 4 × data-parallel 2 = 8" in msg
    assert "24 (accumulation 3)" in msg and "32 (accumulation 4)" in msg
    assert "1, 3, 5, 15" in msg


def test_indivisible_with_accumulation_given():
    with pytest.raises(PlanError, match=r"accumulation 3 × data-parallel 4 = 12.*24 \(micro 2\) or 36 \(micro 3\)"):
        BatchPlan.solve(30, gradient_accumulation_steps=3, world_size=4)


def test_global_smaller_than_one_round_suggests_only_positive_sizes():
    with pytest.raises(PlanError) as e:
        BatchPlan.solve(4, 8, world_size=2)
    assert "16 (accumulation 1)" in str(e.value)
    assert " 0 (" not in str(e.value)


def test_inconsistent_triple_lists_ways_out():
    with pytest.raises(PlanError) as e:
        BatchPlan.solve(64, 4, 3, world_size=4)
    msg = str(e.value)
    assert "48" in msg and "accumulation 4 keeps global 64" in msg


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (
            dict(global_batch_size=0, micro_batch_size=1, world_size=1),
            "global_batch_size must be a positive integer, got 0",
        ),
        (dict(global_batch_size=-8, micro_batch_size=1, world_size=1), "got -8"),
        (dict(global_batch_size=8.0, micro_batch_size=1, world_size=1), "got 8.0 (float)"),
        (dict(global_batch_size=True, micro_batch_size=1, world_size=1), "got True (bool)"),
        (dict(global_batch_size="8", micro_batch_size=1, world_size=1), "got '8' (str)"),
        (dict(world_size=2), "none of them"),
        (dict(gradient_accumulation_steps=2, world_size=2), "only the accumulation steps"),
        (dict(global_batch_size=8, micro_batch_size=1, world_size=0), "world_size must be a positive integer"),
        (dict(global_batch_size=8, micro_batch_size=1, world_size=6, model_parallel_size=4), "1, 2, 3, 6"),
        (dict(global_batch_size=9, world_size=2), "nearest valid global batch sizes: 8 or 10"),
        (dict(global_batch_size=8, micro_batch_size=2, world_size=2, precision="fp8"), "precision must be one of"),
    ],
)
def test_bad_input_is_a_plan_error_with_the_numbers(kwargs, fragment):
    with pytest.raises(PlanError) as e:
        BatchPlan.solve(**kwargs)
    assert fragment in str(e.value)
    assert isinstance(e.value, ValueError)


def test_direct_construction_is_validated_too():
    with pytest.raises(PlanError, match="inconsistent"):
        BatchPlan(global_batch_size=10, micro_batch_size=2, gradient_accumulation_steps=2, world_size=2)


def test_plan_is_frozen():
    p = BatchPlan.solve(8, 2, world_size=2)
    with pytest.raises(AttributeError):
        p.micro_batch_size = 4  # type: ignore[misc]


def test_with_world_size_keeps_global_batch():
    p = BatchPlan.solve(24, 3, world_size=2)  # accumulation 4
    assert p.with_world_size(1).gradient_accumulation_steps == 8
    q = p.with_world_size(4)  # 6 per rank; micro 3 still divides
    assert (q.micro_batch_size, q.gradient_accumulation_steps, q.global_batch_size) == (3, 2, 24)
    r = BatchPlan.solve(24, 4, world_size=2).with_world_size(3)  # 8 per rank: micro stays 4
    assert (r.micro_batch_size, r.gradient_accumulation_steps) == (4, 2)
    s = BatchPlan.solve(24, 4, world_size=2).with_world_size(6)  # 4 per rank
    assert (s.micro_batch_size, s.gradient_accumulation_steps) == (4, 1)
    t = BatchPlan.solve(36, 6, world_size=2).with_world_size(4)  # 9 per rank: micro shrinks to 3
    assert (t.micro_batch_size, t.gradient_accumulation_steps) == (3, 3)


def test_with_world_size_impossible_lists_compatible_sizes():
    with pytest.raises(PlanError) as e:
        BatchPlan.solve(24, 4, world_size=2).with_world_size(5)
    assert "1, 2, 3, 4, 6, 8, 12, 24" in str(e.value)


def test_compatible_world_sizes():
    assert BatchPlan.compatible_world_sizes(24, None, 10) == [1, 2, 3, 4, 6, 8]
    assert BatchPlan.compatible_world_sizes(24, 4, 10) == [1, 2, 3, 6]
    assert BatchPlan.compatible_world_sizes(24, 4, 12, model_parallel_size=2) == [2, 4, 6, 12]


def test_round_trip_through_json(tmp_path):
    p = BatchPlan.solve(48, 2, world_size=4, precision="bf16")
    path = tmp_path / "plan.json"
    path.write_text(p.to_json())
    assert BatchPlan.from_file(path) == p
    assert BatchPlan.from_env({"GRADACCUM_PLAN": str(path)}) == p
    assert BatchPlan.from_env({}) is None


def test_plan_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="plan.json is not valid JSON"):
        BatchPlan.from_file(bad)
    bad.write_text('{"global_batch_size": 8}')
    with pytest.raises(PlanError, match="missing micro_batch_size"):
        BatchPlan.from_file(bad)
    with pytest.raises(PlanError, match="cannot read plan file"):
        BatchPlan.from_file(tmp_path / "absent.json")


def test_importing_the_planner_does_not_import_torch():
    code = "import sys, launcher.plan, launcher.configs, launcher.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ properties
positive = st.integers(min_value=1, max_value=512)
maybe = st.one_of(st.none(), positive)


@settings(max_examples=400, deadline=None)
@given(g=maybe, m=maybe, k=maybe, world=st.integers(1, 64), mp=st.sampled_from([1, 1, 2, 4]))
def test_every_plan_satisfies_the_invariant_and_every_suggestion_is_valid(g, m, k, world, mp):
    try:
        p = BatchPlan.solve(g, m, k, world_size=world, model_parallel_size=mp)
    except PlanError as e:
        _check_suggestions(str(e), g, m, k, world, mp)
        return
    assert p.global_batch_size == p.micro_batch_size * p.gradient_accumulation_steps * p.data_parallel_size
    assert p.data_parallel_size * p.model_parallel_size == p.world_size
    for given_value, attr in ((g, "global_batch_size"), (m, "micro_batch_size"), (k, "gradient_accumulation_steps")):
        if given_value is not None:
            assert getattr(p, attr) == given_value


def _check_suggestions(msg, g, m, k, world, mp):
    """Each 'N (accumulation A)' / 'N (micro B)' suggestion must itself solve."""
    if world % mp:
        return
    for size, kind, value in re.findall(r"(\d+) \((accumulation|micro) (\d+)\)", msg):
        if kind == "accumulation":
            p = BatchPlan.solve(int(size), m, world_size=world, model_parallel_size=mp)
            assert p.gradient_accumulation_steps == int(value)
        else:
            p = BatchPlan.solve(int(size), gradient_accumulation_steps=k, world_size=world, model_parallel_size=mp)
            assert p.micro_batch_size == int(value)
    divisors = re.search(r"sizes that divide (\d+): ([\d, .]+)", msg)
    if divisors:
        for d in re.findall(r"\d+", divisors.group(2)):
            dp = world // mp
            if "micro sizes" in msg:
                BatchPlan.solve(g, int(d), world_size=world, model_parallel_size=mp)
            else:
                BatchPlan.solve(g, gradient_accumulation_steps=int(d), world_size=world, model_parallel_size=mp)
            assert int(divisors.group(1)) * dp == g


@settings(max_examples=200, deadline=None)
@given(g=st.integers(1, 256), m=st.integers(1, 16), world=st.integers(1, 16), new_world=st.integers(1, 32))
def test_with_world_size_keeps_global_or_lists_only_compatible_sizes(g, m, world, new_world):
    try:
        p = BatchPlan.solve(g, m, world_size=world)
    except PlanError:
        return
    try:
        q = p.with_world_size(new_world)
    except PlanError as e:
        listed = [int(x) for x in re.findall(r"\d+", str(e).split("keep it:")[1].split("(")[0])]
        assert new_world not in listed
        for w in listed:
            assert p.with_world_size(w).global_batch_size == g
        return
    assert q.global_batch_size == g and q.micro_batch_size <= m


def test_divisors_match_brute_force_and_factor_64_bit_numbers():
    from launcher.plan import _divisors

    for n in range(1, 2000):
        assert _divisors(n) == [d for d in range(1, n + 1) if n % d == 0]
    # Products of two large primes: a search up to sqrt(n) would take ~10^9 steps each.
    assert _divisors(1999999999999999978) == [1, 2, 999999999999999989, 1999999999999999978]
    assert _divisors(4294967291 * 4294967279) == [1, 4294967279, 4294967291, 4294967291 * 4294967279]
    assert _divisors(2**64 - 59) == [1, 2**64 - 59]  # the largest 64-bit prime
    assert len(_divisors(2**64 - 1)) == 128  # 3·5·17·257·641·65537·6700417
    assert _divisors(2**63) == [2**i for i in range(64)]


def test_huge_world_sizes_are_listed_from_divisors_not_by_search():
    assert BatchPlan.compatible_world_sizes(2**62, None, 2**40)[-2:] == [2**39, 2**40]
    assert BatchPlan.compatible_world_sizes(2**62, 3, 2**40) == []
