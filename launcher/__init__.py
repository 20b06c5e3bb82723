"""gradaccum launcher: plan the batch, render configs and commands, start workers.

Importing this package stays cheap (no torch): only the planner is loaded here.
"""

from launcher.errors import UserError
from launcher.plan import PLAN_ENV_VAR, BatchPlan, PlanError

__all__ = ["BatchPlan", "PlanError", "PLAN_ENV_VAR", "UserError"]
