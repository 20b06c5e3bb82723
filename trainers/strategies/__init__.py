"""Strategies: how one backend wraps the model, syncs, reduces, steps and checkpoints.

`Strategy` (base.py) is the seam between the shared Trainer core (trainers/trainer.py) and a
backend: `single.SingleDeviceStrategy`, `ddp.DDPStrategy`, `deepspeed.DeepSpeedStrategy`.
Import them from their modules (this package imports none of them, so that importing one
backend never imports another's framework). A new backend is one module here (its
strategy plus its thin front-door Trainer subclass) and one line in
launcher/trainer_backends.py.
"""
