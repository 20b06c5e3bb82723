"""Hostfiles: read, validate, filter and write them in DeepSpeed, OpenMPI and MPICH styles.

    deepspeed   host slots=N
    openmpi     host slots=N [max_slots=M]
    mpich       host:N          (or `host` alone: one process)

Blank lines and `#` comments are ignored. Every host name must be a valid DNS name or
IP address: these names end up on ssh / pdsh / mpirun command lines, so a name with a
space, a shell metacharacter or a leading `-` is an error, never quoted and hoped for.
Pure: parsing takes text; only `read_hostfile` / `write_hostfile` touch files.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping

from launcher.atomic import write_text_atomic
from launcher.errors import UserError

FORMATS = ("deepspeed", "openmpi", "mpich")

_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_SLOTS_LINE = re.compile(r"^(?P<host>\S+)(?P<rest>(?:\s+\S+)*)$")
_KEY_VALUE = re.compile(r"^(?P<key>[A-Za-z_]+)=(?P<value>\S*)$")


class HostfileError(UserError):
    """A hostfile, filter or host name that cannot be used; says where and why."""


#: The most slots (processes) one host may have. Far above any real node; a larger
#: number is a typo, and slot lists of that length would exhaust memory.
MAX_SLOTS = 4096
#: How much of a user's text an error message quotes (a 100,000-character line is cut).
QUOTE_LIMIT = 60


def _show(text: str) -> str:
    """`text` quoted for an error message, cut to QUOTE_LIMIT characters."""
    if len(text) <= QUOTE_LIMIT:
        return repr(text)
    return f"{text[:QUOTE_LIMIT]!r}... ({len(text)} characters)"


def _show_slots(slots: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5': slot lists of big hosts stay short in messages."""
    runs: list[list[int]] = []
    for s in sorted(slots):
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


@dataclasses.dataclass(frozen=True)
class HostEntry:
    host: str
    slots: int
    max_slots: int | None = None
    line: int = 0


@dataclasses.dataclass(frozen=True)
class Hostfile:
    entries: tuple[HostEntry, ...]
    source: str = "<hostfile>"
    fmt: str = "deepspeed"

    @property
    def hosts(self) -> list[str]:
        return [e.host for e in self.entries]

    @property
    def total_slots(self) -> int:
        return sum(e.slots for e in self.entries)

    def resources(self) -> dict[str, list[int]]:
        """host -> slot indices, in file order (what include/exclude filters act on)."""
        return {e.host: list(range(e.slots)) for e in self.entries}


def validate_hostname(name: str, where: str = "") -> str:
    """Return `name` if it is a DNS name or an IP address; else raise HostfileError."""
    prefix = f"{where}: " if where else ""
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        pass
    why = None
    if not name:
        why = "it is empty"
    elif name.startswith("-"):
        why = "it starts with '-' and would be read as an option by ssh/pdsh/mpirun"
    elif len(name.rstrip(".")) > 253:
        why = "it is longer than 253 characters"
    else:
        bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in ".-"))})
        if bad:
            why = f"it contains {' '.join(repr(c) for c in bad)}"
        elif not all(_LABEL.match(label) for label in name.rstrip(".").split(".")):
            why = "a dot-separated part is empty, longer than 63 characters, or starts/ends with '-'"
        elif name.rstrip(".").split(".")[-1].isdigit():
            why = "it looks like an IP address but is not a valid one"
    if why:
        raise HostfileError(
            f"{prefix}host name {_show(name)} is not a valid DNS name or IP address: {why} "
            "(letters, digits, '-' and '.' only; host names reach ssh/mpirun command lines)"
        )
    return name


def _positive(value: str, what: str, where: str) -> int:
    if not re.fullmatch(r"[0-9]+", value):
        raise HostfileError(f"{where}: {what}={_show(value)} is not a positive integer")
    if len(value.lstrip("0")) > len(str(MAX_SLOTS)) or int(value) > MAX_SLOTS:
        raise HostfileError(
            f"{where}: {what}={_show(value)} is above the maximum of {MAX_SLOTS} processes per host; "
            "is it a typo?"
        )
    number = int(value)
    if number <= 0:
        raise HostfileError(f"{where}: {what}={number} must be at least 1")
    return number


def _parse_slots_line(body: str, where: str, fmt: str) -> tuple[str, int, int | None]:
    tokens = body.split()
    host, fields = tokens[0], {}
    for token in tokens[1:]:
        kv = _KEY_VALUE.match(token)
        if not kv or kv["key"] not in ("slots", "max_slots", "max-slots"):
            raise HostfileError(f"{where}: cannot read {_show(token)}; expected `HOST slots=N`")
        key = kv["key"].replace("-", "_")
        if key in fields:
            raise HostfileError(f"{where}: {key} is given twice")
        fields[key] = _positive(kv["value"], key, where)
    if "slots" not in fields:
        raise HostfileError(f"{where}: {_show(body)} has no slots=N; write `{_show(host)[1:-1]} slots=1` (the {fmt} format)")
    if "max_slots" in fields:
        if fmt == "deepspeed":
            raise HostfileError(f"{where}: max_slots is OpenMPI syntax; the DeepSpeed format has slots=N only")
        if fields["max_slots"] < fields["slots"]:
            raise HostfileError(f"{where}: max_slots={fields['max_slots']} is below slots={fields['slots']}")
    return host, fields["slots"], fields.get("max_slots")


def _parse_mpich_line(body: str, where: str) -> tuple[str, int, None]:
    if any(c.isspace() for c in body):
        raise HostfileError(f"{where}: cannot read {_show(body)}; expected `HOST:N` (the MPICH format)")
    host, sep, count = body.rpartition(":")
    if not sep:
        return body, 1, None
    if not host:
        raise HostfileError(f"{where}: {_show(body)} has no host name before ':'")
    return host, _positive(count, "process count", where), None


def _guess_format(lines: list[tuple[int, str]]) -> str:
    """From the entries: max_slots anywhere -> openmpi; a first entry without `=` or
    spaces (`host:N`, `host`) -> mpich; else deepspeed (also valid OpenMPI)."""
    if any("max_slots=" in b or "max-slots=" in b for _, b in lines):
        return "openmpi"
    first = lines[0][1]
    return "mpich" if "=" not in first and not any(c.isspace() for c in first) else "deepspeed"


def parse_hostfile(text: str, source: str = "<hostfile>", fmt: str = "auto") -> Hostfile:
    """Parse hostfile text. `fmt`: one of FORMATS, or "auto" (guessed from the first entry)."""
    if fmt not in (*FORMATS, "auto"):
        raise HostfileError(f"unknown hostfile format {_show(fmt)}; choose one of {', '.join(FORMATS)}")
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        body = raw.split("#", 1)[0].strip()
        if body:
            lines.append((number, body))
    if not lines:
        raise HostfileError(f"{source}: no hosts (only blank lines or comments); add lines like `worker-0 slots=2`")
    if fmt == "auto":
        fmt = _guess_format(lines)
    entries: list[HostEntry] = []
    first_line: dict[str, int] = {}
    for number, body in lines:
        where = f"{source}:{number}"
        if fmt == "mpich":
            if "=" in body:
                raise HostfileError(f"{where}: {_show(body)} is `slots=` syntax in a file read as MPICH (`HOST:N`)")
            host, slots, max_slots = _parse_mpich_line(body, where)
        else:
            if not _SLOTS_LINE.match(body) or ("slots=" not in body and ":" in body):
                raise HostfileError(f"{where}: cannot read {_show(body)}; expected `HOST slots=N` (the {fmt} format)")
            host, slots, max_slots = _parse_slots_line(body, where, fmt)
        validate_hostname(host, where)
        if host in first_line:
            raise HostfileError(
                f"{where}: host {host!r} is listed again (first on line {first_line[host]}); "
                "list each host once with its total slots"
            )
        first_line[host] = number
        entries.append(HostEntry(host, slots, max_slots, number))
    return Hostfile(tuple(entries), source, fmt)


def read_hostfile(path: str | os.PathLike[str], fmt: str = "auto") -> Hostfile:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise HostfileError(f"cannot read hostfile {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise HostfileError(f"hostfile {path} is not UTF-8 text") from None
    return parse_hostfile(text, str(path), fmt)


def render_hostfile(slots: Mapping[str, int] | Hostfile, fmt: str) -> str:
    """Hostfile text in `fmt` for host -> slot count (host names validated again)."""
    if fmt not in FORMATS:
        raise HostfileError(f"unknown hostfile format {_show(fmt)}; choose one of {', '.join(FORMATS)}")
    entries = slots.entries if isinstance(slots, Hostfile) else tuple(HostEntry(h, n) for h, n in dict(slots).items())
    if not entries:
        raise HostfileError("no hosts to write")
    out = []
    for e in entries:
        validate_hostname(e.host)
        if isinstance(e.slots, bool) or not isinstance(e.slots, int) or not 0 < e.slots <= MAX_SLOTS:
            raise HostfileError(
                f"host {e.host!r}: slots must be a positive integer up to {MAX_SLOTS}, got {_show(str(e.slots))}"
            )
        if fmt == "mpich":
            out.append(f"{e.host}:{e.slots}")
        elif fmt == "openmpi" and e.max_slots is not None:
            out.append(f"{e.host} slots={e.slots} max_slots={e.max_slots}")
        else:
            out.append(f"{e.host} slots={e.slots}")
    return "\n".join(out) + "\n"


def write_hostfile(path: str | os.PathLike[str], slots: Mapping[str, int] | Hostfile, fmt: str) -> None:
    write_text_atomic(path, render_hostfile(slots, fmt))


# ---------------------------------------------------------------------- filters
def parse_filter(spec: str, flag: str = "filter") -> dict[str, list[int] | None]:
    """`worker-0@worker-1:0,2` -> {"worker-0": None (all slots), "worker-1": [0, 2]}.

    A host named more than once gets the union of its slot lists, as DeepSpeed's
    launcher merges them (`worker-0:1@worker-0:0,1` -> worker-0: [0, 1]). As there, a
    bare name adds no slots to a host that also has a slot list (`w@w:1` is `w:1`)
    and means all slots only when the host is never given slots.
    """
    out: dict[str, list[int] | None] = {}
    for node in spec.split("@"):
        host, sep, slot_text = node.partition(":")
        if not host:
            raise HostfileError(f"{flag} {_show(spec)}: empty host name (expected NAME[:SLOT,...][@NAME...])")
        validate_hostname(host, f"{flag} {_show(spec)}")
        slots: set[int] = set()
        if sep:
            try:
                slots = {int(s) for s in slot_text.split(",")}
            except ValueError:
                raise HostfileError(
                    f"{flag} {_show(spec)}: slots of {host!r} must be comma-separated integers, got {_show(slot_text)}"
                ) from None
        if slots:
            out[host] = sorted(slots | set(out.get(host) or ()))
        else:
            out.setdefault(host, None)
    return out


def apply_filters(
    resources: Mapping[str, Iterable[int]], include: str | None = None, exclude: str | None = None, source: str = ""
) -> dict[str, list[int]]:
    """DeepSpeed launcher semantics: --include keeps only the named hosts/slots, --exclude
    removes them; naming a host or slot the hostfile lacks is an error; hosts left with no
    slots are dropped; file order is kept."""
    where = f" (hostfile {source})" if source else ""
    pool = {h: list(s) for h, s in resources.items()}
    if include and exclude:
        raise HostfileError("--include and --exclude cannot be combined; give one of them")
    spec, flag = (include, "--include") if include else (exclude, "--exclude")
    if not spec:
        return pool
    chosen = parse_filter(spec, flag)
    for host, slots in chosen.items():
        if host not in pool:
            known = ", ".join(list(pool)[:10]) + (f", ... ({len(pool)} hosts)" if len(pool) > 10 else "")
            raise HostfileError(f"{flag} names host {host!r}, which is not in the hostfile{where}: {known}")
        missing = [s for s in slots or () if s not in pool[host]]
        if missing:
            raise HostfileError(
                f"{flag} names slot(s) {_show_slots(missing)} of {host!r}, "
                f"which has slots {_show_slots(pool[host])}{where}"
            )
    result: dict[str, list[int]] = {}
    for host, slots in pool.items():
        if include:
            kept = [] if host not in chosen else (slots if chosen[host] is None else chosen[host])
        else:
            dropped = chosen.get(host, [])
            kept = [] if dropped is None else [s for s in slots if s not in dropped]
        if kept:
            result[host] = kept
    if not result:
        raise HostfileError(f"{flag} {_show(spec)} leaves no slots to run on{where}")
    return result
