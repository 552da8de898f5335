"""Pure planning: ``diff(desired, observed) -> Plan``.

This package does no I/O and imports no git, subprocess or pyroute2 (a test checks it). The
same function serves ``reconciler diff`` (which renders the plan) and ``reconciler apply``
(which executes it): there is no second pipeline for dry runs.
"""

from reconciler.planning.diff import diff, observed_from_desired
from reconciler.planning.guard import DeletionGuardError, check_deletions
from reconciler.planning.rules import disruption_of
from reconciler.planning.suspend import suspend_plan

__all__ = [
    "DeletionGuardError",
    "check_deletions",
    "diff",
    "disruption_of",
    "observed_from_desired",
    "suspend_plan",
]
