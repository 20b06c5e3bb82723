"""`gradaccum verify` as a library: `verify(VerifyOptions(...))` returns a `VerifyReport`.

launcher/verify_options.py: VerifyOptions, defaults and checks, torch-free (the CLI's too)
protocol.py: the parent/worker files and the worker's flags (trainers/worker.py)
run.py: the reference, the workers under torchrun, the comparison
interrupt.py: --interrupt-at-step: SIGKILL the run after a checkpoint, resume it
compare.py: state differences and diagnoses
report.py: the typed report, its JSON and its text
"""

from __future__ import annotations

from launcher.verify_options import CheckedOptions, VerifyOptions, check
from trainers.startup import save_atomic
from trainers.verify.compare import compare_states, diagnose
from trainers.verify.protocol import STEPS_DIR, WorkerArgs, step_path
from trainers.verify.report import Interruption, StepReport, VerifyReport, format_report
from trainers.verify.run import run_checked, run_distributed, run_reference, verify

__all__ = [
    "STEPS_DIR",
    "CheckedOptions",
    "Interruption",
    "StepReport",
    "VerifyOptions",
    "VerifyReport",
    "WorkerArgs",
    "check",
    "compare_states",
    "diagnose",
    "format_report",
    "run_checked",
    "run_distributed",
    "run_reference",
    "save_atomic",
    "step_path",
    "verify",
]
