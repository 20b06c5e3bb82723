"""Compatibility names: the trainer core moved to trainers/trainer.py (Trainer).

`BaseTrainer` is `Trainer`; the helpers live in trainers.trainer and trainers.stepdata.
"""

from trainers.stepdata import batch_items, to_device
from trainers.trainer import (
    UNEQUAL_MEAN_WARNING,
    CommonOptions,
    LossNormalisationWarning,
    Trainer,
    build_from_task,
)

BaseTrainer = Trainer

__all__ = [
    "UNEQUAL_MEAN_WARNING",
    "BaseTrainer",
    "CommonOptions",
    "LossNormalisationWarning",
    "Trainer",
    "batch_items",
    "build_from_task",
    "to_device",
]
