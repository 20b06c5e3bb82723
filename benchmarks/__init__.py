"""Benchmarks that measure gradaccum against what users would use instead, in the same run.

    python -m benchmarks [--quick] [--only NAME[,NAME]] [--out DIR]     # CPU, 2 processes, gloo
    python -m benchmarks --gpu                                          # one NVIDIA GPU

Every benchmark measures its baseline in the same run, interleaved with ours, several
repetitions, and reports ratios (median and spread): the machine is shared and noisy, so
absolute times mean little. One module per benchmark; `__main__` runs them, prints the
table, writes `results.json`, `table.md` and PNG plots, and exits 1 when a target is missed.
"""
