"""DeepSpeed's CPU communication op, built and loaded under a lock that dies with its holder.

On CPU, every `deepspeed.initialize` builds or loads a C++ extension (`deepspeed_shm_comm`)
through torch's JIT loader, which guards the build directory with a lock *file*. A process
killed while it holds that file (a SIGKILLed launch, a pre-empted job, Ctrl-C at start-up)
leaves it behind, and every later DeepSpeed start on the machine waits on it forever, silently.

`load_comm_ops()` loads the op first, inside an `flock` of our own (the kernel releases it when
its holder dies): while holding it no gradaccum process is building, so a torch lock file
found there is a dead process's and is removed (and said). DeepSpeed then finds the op loaded.
"""

from __future__ import annotations

import fcntl
import sys
from pathlib import Path


def load_comm_ops() -> None:
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # DeepSpeed will not build it either (e.g. on GPUs)
    from torch.utils.cpp_extension import _get_build_directory

    build_dir = Path(_get_build_directory(builder.name, verbose=False))
    with open(build_dir.parent / f".gradaccum-{builder.name}.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            print(
                f"gradaccum: removing {stale}, left by a process killed while building or loading "
                "DeepSpeed's CPU communication op (every DeepSpeed start would wait on it)",
                file=sys.stderr,
                flush=True,
            )
            stale.unlink(missing_ok=True)
        builder.load(verbose=False)
