"""Helpers that a rendered sbatch script runs inside its Slurm job (no torch imported).

    python -m launcher.slurm_job master                      -> "ADDR PORT" on stdout
    python -m launcher.slurm_job preflight --timeout S       one task per node, before training
    python -m launcher.slurm_job hostfile --slots P --output FILE

`master`: the first node's address as Slurm knows it (`NodeAddr` from `scontrol show node`),
since a node's name need not resolve (on the two-node cluster of slurm/local-cluster.sh it
does not, and on real clusters the name may point at the wrong interface); the port is
derived from the job id (as launcher.env does) and checked free on the first node, where
the batch script runs. `preflight`: on each node, the master address resolves and answers,
and on the master node the port is free, within a timeout; else a message and exit 2,
instead of a rendezvous that waits forever.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping

from launcher.env import SLURM_PORT_BASE, SLURM_PORT_SPAN, expand_nodelist
from launcher.errors import UserError
from launcher.hostfile import validate_hostname, write_hostfile
from launcher.slurm import SlurmError, parse_scontrol_record

#: Set it in the environment of `sbatch` to force the rendezvous port.
MASTER_PORT_ENV_VAR = "GRADACCUM_MASTER_PORT"
_PORT_TRIES = 64


def job_hosts(environ: Mapping[str, str]) -> list[str]:
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise SlurmError("SLURM_JOB_NODELIST is not set: this helper runs inside a Slurm job")
    return expand_nodelist(nodelist, environ)


def node_address(node: str, environ: Mapping[str, str]) -> str:
    """The node's NodeAddr from `scontrol show node` (its name when Slurm gives none)."""
    from launcher.run import capture_command

    result = capture_command(["scontrol", "show", "node", "-o", node], env=environ, timeout=30)
    record = parse_scontrol_record(result.stdout.strip()) if result.returncode == 0 else {}
    addr = record.get("NodeAddr") or ""
    if not addr or addr == "(null)":
        print(
            f"gradaccum: scontrol gave no NodeAddr for {node} ({result.stderr.strip()}); using its name",
            file=sys.stderr,
        )
        addr = node
    return validate_hostname(addr, f"address of node {node}")


def port_is_free(port: int) -> bool:
    """Can a server bind `port` on every interface here (as torch's TCPStore does)?"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def master(environ: Mapping[str, str]) -> tuple[str, int]:
    hosts = job_hosts(environ)
    addr = node_address(hosts[0], environ)
    if environ.get(MASTER_PORT_ENV_VAR):
        port = int(environ[MASTER_PORT_ENV_VAR])
        if not 0 < port < 65536:
            raise SlurmError(f"{MASTER_PORT_ENV_VAR}={port} is not a TCP port (1-65535)")
        return addr, port
    job_id = int(environ.get("SLURM_JOB_ID", "0"))
    on_first_node = environ.get("SLURMD_NODENAME", hosts[0]) == hosts[0]
    for i in range(_PORT_TRIES):
        port = SLURM_PORT_BASE + (job_id + i) % SLURM_PORT_SPAN
        # The batch script runs on the first node, so a free port here is a free port there.
        if not on_first_node or port_is_free(port):
            return addr, port
    raise SlurmError(
        f"no free port among {_PORT_TRIES} tried from {SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN} on {hosts[0]}; "
        f"set {MASTER_PORT_ENV_VAR} when submitting"
    )


def _resolve(host: str, port: int, timeout_s: float) -> list[str]:
    found: list[object] = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as e:
            found.append(e)

    # getaddrinfo has no timeout of its own; a dead DNS server would block it for long.
    t = threading.Thread(target=lookup, daemon=True)
    t.start()
    t.join(timeout_s)
    if not found:
        raise SlurmError(f"looking up the master address {host!r} took more than {timeout_s:.0f} s (DNS?)")
    if isinstance(found[0], OSError):
        raise SlurmError(f"the master address {host!r} does not resolve: {found[0]}")
    return sorted({info[4][0] for info in found[0]})


def preflight(addr: str, port: int, timeout_s: float, is_master: bool) -> str:
    """Check the rendezvous from this node before any worker waits on it; a summary line."""
    deadline = time.monotonic() + timeout_s
    addresses = _resolve(addr, port, timeout_s)
    if is_master and not port_is_free(port):
        raise SlurmError(
            f"port {port} is already in use on the master node: another job or program holds it; "
            f"resubmit (the port follows the job id) or set {MASTER_PORT_ENV_VAR}"
        )
    try:
        with socket.create_connection((addr, port), timeout=max(0.1, deadline - time.monotonic())):
            pass
    except ConnectionRefusedError:
        answer = "reachable (nothing listens yet)"
    except TimeoutError:
        raise SlurmError(
            f"no answer from the master {addr}:{port} within {timeout_s:.0f} s: a firewall, or an address "
            "this node cannot route to (check `scontrol show node` NodeAddr of the first node)"
        ) from None
    except OSError as e:
        if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL):
            raise SlurmError(f"the master {addr}:{port} is unreachable from this node: {e}") from None
        raise SlurmError(f"cannot connect to the master {addr}:{port}: {e}") from None
    else:
        raise SlurmError(
            f"something already listens on the master's port {addr}:{port} before training started; "
            f"resubmit or set {MASTER_PORT_ENV_VAR}"
        )
    return f"master {addr}:{port} resolves to {', '.join(addresses)}, {answer}" + (", port free" if is_master else "")


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launcher.slurm_job", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("master", help='print "ADDR PORT" for the rendezvous')
    pre = sub.add_parser("preflight", help="check the rendezvous from this node")
    pre.add_argument("--timeout", type=float, default=60.0)
    hf = sub.add_parser("hostfile", help="write a DeepSpeed hostfile of the job's nodes")
    hf.add_argument("--slots", type=int, required=True)
    hf.add_argument("--output", required=True)
    args = p.parse_args(argv)
    environ = os.environ
    node = environ.get("SLURMD_NODENAME", socket.gethostname())
    if args.command == "master":
        addr, port = master(environ)
        print(addr, port)
    elif args.command == "preflight":
        if not environ.get("MASTER_ADDR") or not environ.get("MASTER_PORT"):
            raise SlurmError("MASTER_ADDR and MASTER_PORT must be set (the batch script exports them)")
        is_master = environ.get("SLURM_NODEID", "0") == "0"
        line = preflight(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), args.timeout, is_master)
        print(f"gradaccum preflight [{node}]: {line}", file=sys.stderr)
    else:
        write_hostfile(args.output, {h: args.slots for h in job_hosts(environ)}, "deepspeed")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except UserError as e:
        node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
        print(f"gradaccum [{node}]: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
