"""Hostfiles: good and bad files, include/exclude against DeepSpeed's own filter,
conversion round-trips, the injection cases, the examples in hostfiles/, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.hostfile import (
    HostfileError,
    apply_filters,
    parse_hostfile,
    read_hostfile,
    render_hostfile,
    validate_hostname,
)
from tests.conftest import REPO, run_cli

GOOD = [
    ("deepspeed", "worker-0 slots=4\nworker-1 slots=2\n", {"worker-0": 4, "worker-1": 2}),
    ("deepspeed", "# comment\n\n  worker-0   slots=1  # trailing\n", {"worker-0": 1}),
    ("openmpi", "n1.example.org slots=2 max_slots=4\nn2 slots=2\n", {"n1.example.org": 2, "n2": 2}),
    ("mpich", "compute-a1:8\ncompute-b7\n", {"compute-a1": 8, "compute-b7": 1}),
    ("deepspeed", "10.0.0.1 slots=2\nfd00::2 slots=1\n", {"10.0.0.1": 2, "fd00::2": 1}),
    ("deepspeed", "localhost slots=2\r\n", {"localhost": 2}),
]


@pytest.mark.parametrize("fmt, text, slots", GOOD)
def test_good_files(fmt, text, slots):
    hostfile = parse_hostfile(text)
    assert hostfile.fmt == fmt
    assert {e.host: e.slots for e in hostfile.entries} == slots
    assert hostfile.total_slots == sum(slots.values())
    assert hostfile.resources() == {h: list(range(n)) for h, n in slots.items()}


BAD = [
    ("worker-0 slots=0\n", ":1: slots=0 must be at least 1"),
    ("worker-0 slots=-2\n", ":1: slots='-2' is not a positive integer"),
    ("worker-0 slots=2.5\n", "not a positive integer"),
    ("worker-0 slots=two\n", "not a positive integer"),
    ("worker-0 slots=\n", "not a positive integer"),
    ("a slots=1\nworker-0\n", ":2: 'worker-0' has no slots=N"),
    ("a slots=1\nb slots=2 gpus=2\n", ":2: cannot read 'gpus=2'"),
    ("a slots=1\na slots=2\n", ":2: host 'a' is listed again (first on line 1)"),
    ("a slots=1 slots=2\n", "slots is given twice"),
    ("a slots=4 max_slots=2\n", "max_slots=2 is below slots=4"),
    ("# only a comment\n\n", "no hosts"),
    ("", "no hosts"),
    ("a:2\nb slots=2\n", ":2: 'b slots=2' is `slots=` syntax in a file read as MPICH"),
    ("a:0\n", "process count=0 must be at least 1"),
    ("a:x\n", "process count='x' is not a positive integer"),
    ("a slots=1\nb:2\n", ":2: cannot read 'b:2'"),
    # injection: these names would reach ssh / pdsh / mpirun command lines
    ("-oProxyCommand=touch slots=1\n", "starts with '-'"),
    ("a;rm slots=1\n", "contains ';'"),
    ("$(reboot) slots=1\n", "contains"),
    ("a`id` slots=1\n", "contains '`'"),
    ("a|b slots=1\n", "contains '|'"),
    ("under_score slots=1\n", "contains '_'"),
    ("host-.example slots=1\n", "starts/ends with '-'"),
    ("a..b slots=1\n", "part is empty"),
    ("999.1.1.1 slots=1\n", "not a valid one"),
    ("x" * 64 + " slots=1\n", "longer than 63"),
    ("héllo slots=1\n", "contains 'é'"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_bad_files_name_file_line_and_reason(text, message, tmp_path):
    path = tmp_path / "hosts"
    path.write_text(text)
    with pytest.raises(HostfileError) as info:
        read_hostfile(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_format_given_explicitly():
    with pytest.raises(HostfileError, match="has no slots=N"):
        parse_hostfile("worker-0\n", fmt="deepspeed")
    assert parse_hostfile("worker-0\n").fmt == "mpich"  # auto: a bare host is MPICH's one process
    with pytest.raises(HostfileError, match="max_slots is OpenMPI syntax"):
        parse_hostfile("a slots=1 max_slots=2\n", fmt="deepspeed")


def test_unreadable_file(tmp_path):
    with pytest.raises(HostfileError, match="cannot read hostfile"):
        read_hostfile(tmp_path / "missing")


@pytest.mark.parametrize("name", ["a b", "a\tb", "a\nb", "a'b", 'a"b', "a&b", "a>b", "a*", "~root", "", "-"])
def test_validate_hostname_rejects_shell_and_space(name):
    with pytest.raises(HostfileError):
        validate_hostname(name)


@pytest.mark.parametrize("name", ["localhost", "node01", "gpu-a1.cluster.example.org", "10.1.2.3", "fd00::2", "a."])
def test_validate_hostname_accepts(name):
    assert validate_hostname(name) == name


# ------------------------------------------------------------------------ filters
POOL = {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1, 2, 3], "worker-2": [0, 1]}


@pytest.mark.parametrize(
    "include, exclude, expected",
    [
        ("worker-0@worker-1:0,2", None, {"worker-0": [0, 1, 2, 3], "worker-1": [0, 2]}),
        ("worker-2", None, {"worker-2": [0, 1]}),
        ("worker-1:3,1", None, {"worker-1": [1, 3]}),
        (None, "worker-1:0", {"worker-0": [0, 1, 2, 3], "worker-1": [1, 2, 3], "worker-2": [0, 1]}),
        (None, "worker-0@worker-2:1", {"worker-1": [0, 1, 2, 3], "worker-2": [0]}),
        (None, None, POOL),
    ],
)
def test_filters(include, exclude, expected):
    assert apply_filters(POOL, include, exclude) == expected


@pytest.mark.parametrize(
    "include, exclude, expected",
    [
        ("worker-0:1@worker-0:0,1", None, {"worker-0": [0, 1]}),
        ("worker-0:3@worker-2@worker-0:0", None, {"worker-0": [0, 3], "worker-2": [0, 1]}),
        ("worker-0@worker-0:1", None, {"worker-0": [1]}),  # DeepSpeed: the slot list wins
        ("worker-2@worker-2", None, {"worker-2": [0, 1]}),
        (None, "worker-0:1@worker-0:0", {"worker-0": [2, 3], "worker-1": [0, 1, 2, 3], "worker-2": [0, 1]}),
        (None, "worker-2@worker-2:1", {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1, 2, 3], "worker-2": [0]}),
    ],
)
@pytest.mark.deepspeed
def test_a_host_named_twice_merges_its_slots_as_deepspeed_does(include, exclude, expected):
    from deepspeed.launcher.runner import parse_resource_filter

    assert dict(parse_resource_filter(POOL, include or "", exclude or "")) == expected
    assert apply_filters(POOL, include, exclude) == expected


@pytest.mark.parametrize(
    "include, exclude, message",
    [
        ("worker-9", None, "names host 'worker-9', which is not in the hostfile"),
        ("worker-2:5", None, "slot(s) 5 of 'worker-2', which has slots 0-1"),
        ("worker-0", "worker-1", "cannot be combined"),
        (None, "worker-0@worker-1@worker-2", "leaves no slots"),
        ("worker-0:a", None, "comma-separated integers"),
        ("worker-0@@worker-1", None, "empty host name"),
        ("-oProxyCommand=x", None, "starts with '-'"),
    ],
)
def test_filter_errors(include, exclude, message):
    with pytest.raises(HostfileError) as info:
        apply_filters(POOL, include, exclude, "hosts.txt")
    assert message in str(info.value)


_hosts = st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=4, unique=True)


@st.composite
def _pool_and_filter(draw):
    hosts = draw(_hosts)
    pool = {h: list(range(draw(st.integers(1, 4)))) for h in hosts}
    # Hosts may repeat and slots may repeat: DeepSpeed merges both (issue 18).
    chosen = draw(st.lists(st.sampled_from(hosts), min_size=1, max_size=len(hosts) + 2))
    parts = []
    for h in chosen:
        slots = draw(st.one_of(st.none(), st.lists(st.sampled_from(pool[h]), min_size=1, max_size=5)))
        parts.append(h if slots is None else f"{h}:{','.join(map(str, slots))}")
    return pool, "@".join(parts), draw(st.booleans())


@settings(max_examples=200, deadline=None)
@given(_pool_and_filter())
@pytest.mark.deepspeed
def test_filters_match_deepspeeds_own(case):
    """Same result as DeepSpeed's launcher (deepspeed.launcher.runner) on valid filters."""
    from deepspeed.launcher.runner import parse_resource_filter

    pool, spec, is_include = case
    include, exclude = (spec, None) if is_include else (None, spec)
    theirs = {h: list(s) for h, s in parse_resource_filter(pool, include or "", exclude or "").items()}
    if not theirs:
        with pytest.raises(HostfileError, match="leaves no slots"):
            apply_filters(pool, include, exclude)
    else:
        assert apply_filters(pool, include, exclude) == theirs


@pytest.mark.deepspeed
def test_deepspeed_reads_what_we_write():
    from deepspeed.launcher.runner import _parse_hostfile

    slots = {"worker-0": 4, "10.0.0.2": 2}
    assert dict(_parse_hostfile(render_hostfile(slots, "deepspeed").splitlines())) == slots


# --------------------------------------------------------------------- round trips
@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9](\.[a-z]{2,5})?", fullmatch=True),
        st.integers(1, 64),
        min_size=1,
        max_size=6,
    ),
    st.permutations(["deepspeed", "openmpi", "mpich"]),
)
def test_conversion_round_trips(slots, formats):
    text = render_hostfile(slots, formats[0])
    for fmt in formats[1:] + [formats[0]]:
        hostfile = parse_hostfile(text, fmt="auto")
        assert {e.host: e.slots for e in hostfile.entries} == slots
        text = render_hostfile(hostfile, fmt)
    assert text == render_hostfile(slots, formats[0])


def test_max_slots_survives_openmpi_round_trip():
    text = "n1 slots=2 max_slots=4\nn2 slots=1\n"
    assert render_hostfile(parse_hostfile(text), "openmpi") == text


# ------------------------------------------------------------------ example files
EXAMPLES = sorted((REPO / "hostfiles").glob("*"))


def test_examples_exist_for_each_format():
    assert {read_hostfile(p).fmt for p in EXAMPLES} == {"deepspeed", "openmpi", "mpich"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_hostfile_is_valid(path: Path):
    hostfile = read_hostfile(path)
    assert hostfile.total_slots > 0
    for fmt in ("deepspeed", "openmpi", "mpich"):
        again = parse_hostfile(render_hostfile(hostfile, fmt), fmt=fmt)
        assert [(e.host, e.slots) for e in again.entries] == [(e.host, e.slots) for e in hostfile.entries]


# ----------------------------------------------------------------------------- CLI
def test_cli_check_json_with_include():
    r = run_cli("hostfile", "check", "hostfiles/deepspeed.txt", "--include", "worker-0@worker-1:0,2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"hosts": {"worker-0": [0, 1, 2, 3], "worker-1": [0, 2]}}


def test_cli_check_errors_exit_2(tmp_path):
    bad = tmp_path / "hosts"
    bad.write_text("ok slots=1\nbad;host slots=1\n")
    r = run_cli("hostfile", "check", str(bad), "--json")
    assert r.returncode == 2 and r.stdout == ""
    assert f"{bad}:2" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("hostfile", "check", "hostfiles/deepspeed.txt", "--exclude", "worker-7")
    assert r.returncode == 2 and "worker-7" in r.stderr


def test_cli_convert_writes_atomically_and_round_trips(tmp_path):
    out = tmp_path / "hosts.mpich"
    r = run_cli(
        "hostfile", "convert", "hostfiles/deepspeed.txt", "--to", "mpich", "--exclude", "worker-1:0", "-o", str(out)
    )
    assert r.returncode == 0, r.stderr
    assert out.read_text() == "worker-0:4\nworker-1:3\n10.0.0.12:2\n"
    r = run_cli("hostfile", "convert", str(out), "--to", "deepspeed")
    assert r.stdout == "worker-0 slots=4\nworker-1 slots=3\n10.0.0.12 slots=2\n"


def test_cli_include_naming_a_host_twice_merges_its_slots():
    r = run_cli("hostfile", "check", "hostfiles/deepspeed.txt", "--include", "worker-0:1@worker-0:0,1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"hosts": {"worker-0": [0, 1]}}


@pytest.mark.parametrize(
    "text", ["w slots=100000000000000000000000\n", "w slots=1000000000\n", "w slots=4097\n", "w:4097\n"]
)
def test_slots_above_the_maximum_are_refused_and_say_so(text):
    with pytest.raises(HostfileError) as e:
        parse_hostfile(text, "hosts.txt")
    assert "above the maximum of 4096 processes per host" in str(e.value)
    assert parse_hostfile("w slots=4096\n").total_slots == parse_hostfile("w:4096\n").total_slots == 4096


@pytest.mark.parametrize(
    "line",
    ["x" * 100_000 + " slots=1", "w slots=1 " + "y" * 100_000, "w slots=" + "9" * 100_000, "w:" + "z" * 100_000],
)
def test_a_huge_hostfile_line_is_cut_in_the_error(line):
    with pytest.raises(HostfileError) as e:
        parse_hostfile(line + "\n", "hosts.txt")
    assert len(str(e.value)) < 400 and "(100" in str(e.value) and "characters)" in str(e.value)


def test_cli_check_huge_slots_exits_2_in_one_line(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("w slots=100000000000000000000000\n")
    r = run_cli("hostfile", "check", str(hosts))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "above the maximum of 4096" in r.stderr and len(r.stderr.strip().splitlines()) == 1
