"""Registrations that have not returned: what engines' watchdogs and health checks report.

(Being built: the registration watchdog of the never-hang work fills this in.)
"""

from __future__ import annotations


def describe_registration_in_progress() -> str:
    """One line per symmetric-window registration that is running on this process
    (communicator, ranks, segment sizes, seconds waited); empty when none is."""
    return ""
