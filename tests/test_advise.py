"""gradaccum advise: the pure model on fixed numbers, a real run at world sizes 1 and 2, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launcher.advise import (
    DDP_BUCKET_BYTES,
    DDP_FIRST_BUCKET_BYTES,
    AdviseError,
    Compute,
    Line,
    Link,
    StateBytes,
    calibrate,
    check_world_sizes,
    communication_s,
    ddp_buckets,
    ddp_exposed_allreduce_s,
    enumerate_options,
    fit_link,
    memory_at,
    parse_interconnect,
    recommend,
    ring_allreduce_s,
)
from launcher.memory import MemoryModel
from tests.conftest import REPO, run_cli

MiB = 1024**2
LINK = Link(1e9, 10e-6)  # 1 GB/s, 10 µs


# ------------------------------------------------------------------ collectives
def test_ring_allreduce_formula():
    # 2(N−1)/N · bytes/B + 2(N−1)·L at N=4, 100 MB, 1 GB/s, 10 µs: 0.15 s + 60 µs
    assert ring_allreduce_s(100e6, 4, LINK) == pytest.approx(0.15 + 60e-6)
    assert ring_allreduce_s(100e6, 2, LINK) == pytest.approx(0.1 + 20e-6)
    assert ring_allreduce_s(100e6, 1, LINK) == 0.0


def test_link_fitted_from_two_sizes_recovers_bandwidth_and_latency():
    link = Link(2e9, 50e-6)
    small, large = 4096, 8 * MiB
    fitted = fit_link(small, ring_allreduce_s(small, 3, link), large, ring_allreduce_s(large, 3, link), 3)
    assert fitted.bandwidth_bytes_per_s == pytest.approx(2e9, rel=1e-9)
    assert fitted.latency_s == pytest.approx(50e-6, rel=1e-9)


def test_interconnect_parsing_and_zero_bandwidth():
    link = parse_interconnect("25,8")
    assert (link.bandwidth_bytes_per_s, link.latency_s) == (25e9, pytest.approx(8e-6))
    assert parse_interconnect("12.5").latency_s == pytest.approx(5e-6)  # the stated default
    for bad in ("0", "0,5", "-3", "fast", "10,-1"):
        with pytest.raises(AdviseError):
            parse_interconnect(bad)


# ------------------------------------------------------------------ overlap
def test_ddp_buckets_small_first_then_full():
    assert ddp_buckets(60 * MiB) == [DDP_FIRST_BUCKET_BYTES, DDP_BUCKET_BYTES, DDP_BUCKET_BYTES, 9 * MiB]
    assert ddp_buckets(0.5 * MiB) == [0.5 * MiB]


def test_one_bucket_cannot_overlap():
    # everything lands in one bucket, ready when backward ends: all of it is exposed
    g = 0.5 * MiB
    assert ddp_exposed_allreduce_s(g, 2, LINK, backward_s=1.0) == pytest.approx(ring_allreduce_s(g, 2, LINK))


def test_long_backward_hides_all_but_the_last_bucket():
    g = 51 * MiB  # buckets 1, 25, 25 MiB
    exposed = ddp_exposed_allreduce_s(g, 2, LINK, backward_s=10.0)
    assert exposed == pytest.approx(ring_allreduce_s(25 * MiB, 2, LINK))


def test_short_backward_exposes_almost_everything():
    g = 51 * MiB
    full = sum(ring_allreduce_s(b, 2, LINK) for b in ddp_buckets(g))
    exposed = ddp_exposed_allreduce_s(g, 2, LINK, backward_s=1e-4)
    assert full - 1e-4 <= exposed + 1e-12 and exposed < full


def test_sharded_schedules_per_micro_step_or_per_step():
    state = StateBytes(gradient_bytes=1e9, parameter_bytes=1e9, optimizer_state_bytes=2e9)
    half = ring_allreduce_s(1e9, 4, LINK) / 2
    k = 5

    def comm(backend, stage=0):
        return communication_s(backend, stage, 4, k, state, LINK, backward_s=0.0)[0]

    assert comm("deepspeed", 0) == pytest.approx(2 * half)
    assert comm("deepspeed", 1) == pytest.approx(2 * half)
    assert comm("deepspeed", 2) == pytest.approx(k * half + half)
    assert comm("deepspeed", 3) == pytest.approx(k * 3 * half)
    assert comm("fsdp") == pytest.approx(k * 2 * half + half)
    assert communication_s("ddp", 0, 1, k, state, None, 0.0)[0] == 0.0


# ------------------------------------------------------------------ memory and choice
def test_memory_fit_and_sharding():
    model = MemoryModel.fit([(1, 1100), (2, 1200), (4, 1400)])
    assert (model.base_bytes, model.per_sample_bytes) == (pytest.approx(1000), pytest.approx(100))
    state = StateBytes(gradient_bytes=100, parameter_bytes=100, optimizer_state_bytes=200)
    assert memory_at(model, state, "ddp", 0, 4).base_bytes == pytest.approx(1000)
    assert memory_at(model, state, "deepspeed", 1, 4).base_bytes == pytest.approx(1000 - 0.75 * 200)
    assert memory_at(model, state, "deepspeed", 2, 4).base_bytes == pytest.approx(1000 - 0.75 * 300)
    assert memory_at(model, state, "fsdp", 0, 4).base_bytes == pytest.approx(1000 - 0.75 * 400)


def _options(budget):
    # micro-step 10 ms + 1 ms/sample, backward a third of that; optimizer 5 ms; 10 MB of gradients
    compute = {
        1: Compute(Line(0.006, 0.0006), Line(0.004, 0.0004), 0.005, None),
        2: Compute(Line(0.006, 0.0006), Line(0.004, 0.0004), 0.005, Link(1e8, 0.0)),
    }
    memory = MemoryModel(1000, 100)
    state = StateBytes(10e6, 10e6, 20e6)
    return enumerate_options(8, [1, 2], compute, memory, state, {1: budget, 2: budget})


def test_options_enumerate_every_world_and_dividing_micro_batch_with_predicted_times():
    options = _options(None)
    assert [(o.world_size, o.micro_batch_size, o.gradient_accumulation_steps) for o in options] == [
        (1, 1, 8), (1, 2, 4), (1, 4, 2), (1, 8, 1), (2, 1, 4), (2, 2, 2), (2, 4, 1)
    ]  # fmt: skip
    w1m8 = options[3]
    assert w1m8.predicted_step_s == pytest.approx(0.010 + 0.008 + 0.005)
    w2m4 = options[6]
    backward = 0.004 + 0.0004 * 4
    exposed = ddp_exposed_allreduce_s(10e6, 2, Link(1e8, 0.0), backward)
    assert w2m4.communication_s == pytest.approx(exposed)
    assert w2m4.predicted_step_s == pytest.approx(0.010 + 0.004 + exposed + 0.005)
    assert w1m8.samples_per_s == pytest.approx(8 / w1m8.predicted_step_s)
    assert w1m8.scaling_efficiency == pytest.approx(1.0)
    assert w2m4.scaling_efficiency == pytest.approx(w2m4.samples_per_s / 2 / w1m8.samples_per_s)


def test_calibration_adds_the_trainers_overheads():
    raw = Compute(Line(0.006, 0.0006), Line(0.004, 0.0004), 0.005, None)  # micro 1: 11 ms raw
    # real trainer steps at micro 1: K=1 20 ms, K=4 59 ms -> 13 ms per micro-step, 2 ms more than raw
    cal = calibrate(raw, 1, {1: 0.020, 4: 0.059}, gradient_bytes=0, ranks=1, local=None)
    assert cal.micro_overhead_s == pytest.approx(0.002)
    assert cal.step_overhead_s == pytest.approx(0.020 - 0.013 - 0.005)
    assert cal.micro_step_s(1) == pytest.approx(0.013)
    # at two ranks the modelled all-reduce on the local link is not counted as overhead
    link = Link(1e8, 0.0)
    exposed = ddp_exposed_allreduce_s(1e6, 2, link, raw.backward(1))
    cal2 = calibrate(raw, 1, {1: 0.020 + exposed, 4: 0.059 + exposed}, 1e6, 2, link)
    assert cal2.step_overhead_s == pytest.approx(cal.step_overhead_s)
    # noise never makes the trainer faster than its parts
    assert calibrate(raw, 1, {1: 0.001, 4: 0.002}, 0, 1, None).step_overhead_s == 0.0


def test_recommend_fastest_that_fits():
    options = _options(None)
    best, why = recommend(options, {1: None, 2: None})
    assert best == min(options, key=lambda o: o.predicted_step_s)
    assert "fastest" in why
    # a budget that only micro-batches up to 2 fit under (1000 + 100·m ≤ 0.9 · 1400)
    tight = _options(1400)
    best, why = recommend(tight, {1: 1400, 2: 1400})
    assert best.micro_batch_size <= 2 and best.fits
    assert best == min((o for o in tight if o.fits), key=lambda o: o.predicted_step_s)
    assert "do not fit" in why


def test_recommend_when_nothing_fits():
    with pytest.raises(AdviseError, match="no option fits"):
        recommend(_options(500), {1: 500, 2: 500})


def test_world_sizes_must_divide_the_global_batch():
    assert check_world_sizes(24, [2, 1, 2]) == [1, 2]
    with pytest.raises(AdviseError, match="5 do not divide the global batch 24"):
        check_world_sizes(24, [1, 5])


# ------------------------------------------------------------------ the command
def _one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("gradaccum advise: error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in errors[0]


def test_bad_world_sizes_and_bandwidth_exit_2_before_measuring():
    base = ("advise", "--task", "trainers.example:task", "--global-batch-size", "24")
    _one_line_error(run_cli(*base, "--world-sizes", "1,5", timeout=30), "5 do not divide", "24")
    _one_line_error(run_cli(*base, "--world-sizes", "1,x", timeout=30), "--world-sizes")
    _one_line_error(run_cli(*base, "--world-sizes", "1,2", "--interconnect", "0", timeout=30), "bandwidth")
    _one_line_error(run_cli(*base, "--world-sizes", "1", "--zero-stage", "2", timeout=30), "DeepSpeed setting")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_task_that_cannot_be_imported_exits_2():
    result = run_cli(
        "advise", "--task", "no_such_module:task", "--global-batch-size", "8", "--world-sizes", "1", timeout=170
    )
    _one_line_error(result, "no_such_module")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_budget_nothing_fits_exits_2_and_the_command_imports_no_torch():
    # in-process, so that sys.modules shows what the advisor's own process imported
    code = (
        "import sys; from launcher.cli import main; "
        "rc = main(['advise', '--task', 'trainers.example:task', '--global-batch-size', '8', "
        "'--world-sizes', '1', '--memory-budget', '1MiB']); "
        "print(rc, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=170, cwd=REPO)
    assert out.stdout.split() == ["2", "False"], out.stdout + out.stderr
    assert "no option fits" in out.stderr and "--memory-budget" in out.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_advise_at_world_sizes_1_and_2():
    result = run_cli(
        "advise", "--task", "trainers.example:task", "--global-batch-size", "24", "--world-sizes", "1,2", "--json",
        timeout=290,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    keys = {"world_size", "micro_batch_size", "gradient_accumulation_steps", "predicted_step_s"}
    keys |= {"predicted_peak_bytes", "fits"}
    assert keys <= set(out["recommended"])
    combos = {(o["world_size"], o["micro_batch_size"], o["gradient_accumulation_steps"]) for o in out["options"]}
    expected = {(w, m, 24 // (w * m)) for w in (1, 2) for m in range(1, 25) if (24 // w) % m == 0}
    assert combos == expected
    for o in out["options"]:
        assert keys <= set(o) and o["predicted_step_s"] > 0 and o["predicted_peak_bytes"] > 0
        assert o["tokens_per_s"] > o["samples_per_s"] > 0  # the example LM counts tokens
    fitting = [o for o in out["options"] if o["fits"]]
    assert out["recommended"]["predicted_step_s"] == min(o["predicted_step_s"] for o in fitting)
    world2 = out["measured"]["trials"]["2"]["link"]
    assert world2["bandwidth_bytes_per_s"] > 0 and world2["source"].startswith("measured")
    assert out["measured"]["gradient_bytes"] > 0 and out["measured"]["memory"]["per_sample_bytes"] >= 0
