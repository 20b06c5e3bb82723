"""The built-in example task, optionally slowed down, so that a test can signal a run mid-way.

    --task tests.scripts.slow_task:task      with GRADACCUM_TEST_MICRO_STEP_DELAY=SECONDS (default 0)

Each micro-step's loss sleeps first; the arithmetic is the example's, so the weights are too.
"""

from __future__ import annotations

import dataclasses
import os
import time

from trainers.example import task as example_task


def task():
    base = example_task()
    delay = float(os.environ.get("GRADACCUM_TEST_MICRO_STEP_DELAY", "0"))
    if delay <= 0:
        return base

    def slow_loss(model, batch):
        time.sleep(delay)
        return base.loss(model, batch)

    return dataclasses.replace(base, loss=slow_loss)
