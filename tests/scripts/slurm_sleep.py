"""A job that waits, for `gradaccum slurm status` / `cancel` and signal forwarding tests.

    slurm_sleep.py [SECONDS]

Prints `sleeping`, then sleeps; on USR1 or TERM prints `got SIGUSR1` / `got SIGTERM` and exits 0.
"""

import signal
import sys
import time


def on_signal(signum, _frame):
    print(f"got {signal.Signals(signum).name}", flush=True)
    sys.exit(0)


signal.signal(signal.SIGUSR1, on_signal)
signal.signal(signal.SIGTERM, on_signal)
print("sleeping", flush=True)
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 600)
