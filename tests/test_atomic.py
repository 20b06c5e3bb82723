"""launcher.atomic: writes go through symlinks, refuse non-regular files, fail in one line."""

from __future__ import annotations

import os
import stat

import pytest

from launcher.atomic import FileError, make_dir, read_json, remove_stale_temps, write_text_atomic
from launcher.errors import UserError
from tests.conftest import run_cli


def test_a_write_through_a_symlink_updates_its_target_and_keeps_the_link(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    (tmp_path / "mid.json").symlink_to("real.json")
    link = tmp_path / "link.json"
    link.symlink_to("mid.json")  # a chain of links ends at real.json
    write_text_atomic(link, "new")
    assert link.is_symlink() and (tmp_path / "mid.json").is_symlink()
    assert real.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "mid.json", "real.json"]


def test_a_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "link.json"
    link.symlink_to("sub-target.json")
    write_text_atomic(link, "x")
    assert link.is_symlink() and (tmp_path / "sub-target.json").read_text() == "x"


@pytest.mark.parametrize("kind", ["fifo", "fifo-link", "directory", "device"])
def test_non_regular_targets_are_refused_and_left_as_they_were(tmp_path, kind):
    if kind.startswith("fifo"):
        target = tmp_path / "pipe"
        os.mkfifo(target)
        named = tmp_path / "pipe-link" if kind == "fifo-link" else target
        if named != target:
            named.symlink_to(target)
        expected = "a FIFO (named pipe)"
    elif kind == "directory":
        target = named = tmp_path / "dir"
        target.mkdir()
        expected = "a directory"
    else:
        target = named = "/dev/null"
        expected = "a character device"
    with pytest.raises(FileError) as e:
        write_text_atomic(named, "x")
    assert f"refusing to write {target}" in str(e.value) and expected in str(e.value)
    mode = os.lstat(target).st_mode
    assert {"directory": stat.S_ISDIR, "device": stat.S_ISCHR}.get(kind, stat.S_ISFIFO)(mode)
    if kind != "device":
        assert not list(tmp_path.glob(".*.tmp"))


def test_a_missing_directory_is_one_file_error(tmp_path):
    with pytest.raises(FileError, match=r"cannot write .*/no/such/x.json: No such file or directory"):
        write_text_atomic(tmp_path / "no" / "such" / "x.json", "x")


def test_make_dir_over_an_existing_file_says_so(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(FileError, match="exists and is not a directory"):
        make_dir(tmp_path / "f", "run directory")
    assert make_dir(tmp_path / "a" / "b").is_dir()


def test_remove_stale_temps_removes_only_that_files_temps(tmp_path):
    for name in (".latest.abc123.tmp", ".latest.x.tmp", ".other.abc.tmp", "latest"):
        (tmp_path / name).write_text("")
    removed = remove_stale_temps(tmp_path / "latest")
    assert sorted(p.name for p in removed) == [".latest.abc123.tmp", ".latest.x.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.abc.tmp", "latest"]


def test_read_json_of_a_binary_file_is_one_error(tmp_path):
    path = tmp_path / "base.json"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        read_json(path, "base DeepSpeed config")


@pytest.mark.parametrize(
    "output, message",
    [("{tmp}/no/such/dir/x.json", "No such file or directory"), ("/dev/null", "it is a character device")],
)
def test_cli_config_output_errors_exit_2_in_one_line(tmp_path, output, message):
    r = run_cli("config", "ddp", "--global-batch-size", "8", "--world-size", "2", "-o", output.format(tmp=tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_config_output_through_a_symlink(tmp_path):
    (tmp_path / "real.json").write_text("{}")
    (tmp_path / "link.json").symlink_to("real.json")
    r = run_cli("config", "ddp", "--global-batch-size", "8", "--world-size", "2", "-o", str(tmp_path / "link.json"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "link.json").is_symlink() and '"world_size": 2' in (tmp_path / "real.json").read_text()


def test_cli_config_base_binary_file_exits_2(tmp_path):
    base = tmp_path / "base.json"
    base.write_bytes(bytes(range(256)))
    r = run_cli("config", "deepspeed", "--global-batch-size", "8", "--world-size", "2", "--base", str(base))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "is not UTF-8 text" in r.stderr
