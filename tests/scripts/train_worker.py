"""A training script as a user would pass it to `gradaccum launch -- SCRIPT`: the DDP
worker of `gradaccum verify` (trainers.worker), which reads the plan from $GRADACCUM_PLAN
and finds rank/world through launcher.env under any launcher. Replace with
examples/train.py once that exists.

    train_worker.py --steps S --output-dir DIR [--no-shuffle]
"""

import sys

from trainers.worker import main

if __name__ == "__main__":
    sys.exit(main())
