"""Strategies: how one backend wraps the model, syncs, reduces, steps and checkpoints.

`Strategy` (base.py) is the seam between the shared Trainer core (trainers/trainer.py) and a
backend; `SingleDeviceStrategy`, `DDPStrategy` and `DeepSpeedStrategy` implement it. A new
backend is one module here plus its front-door trainer class and one line in
launcher/trainer_backends.py. The DeepSpeed module is imported on first use only.
"""

from trainers.strategies.base import Strategy
from trainers.strategies.ddp import DDPStrategy
from trainers.strategies.single import SingleDeviceStrategy

__all__ = ["DDPStrategy", "SingleDeviceStrategy", "Strategy"]
