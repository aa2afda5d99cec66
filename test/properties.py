"""
Hypothesis settings for the property tests (test/*_property_test.py).

Two profiles, chosen by the environment:

    check   (default, make check) a modest number of examples, derandomized
            so the suite gives the same answer on every run
    stress  (IMAGEIO_STRESS=1, make stress) many more examples, random,
            failures kept in hypothesis' example database (.hypothesis/)

HYPOTHESIS_PROFILE=name selects a profile explicitly. No deadline: the
machine is shared and loaded, and a slow example is not a failure.
"""

import os

from hypothesis import HealthCheck
from hypothesis import settings

CHECK_EXAMPLES = 100
STRESS_EXAMPLES = 5000

_common = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

settings.register_profile(
    "check", max_examples=CHECK_EXAMPLES, derandomize=True, database=None,
    **_common)
settings.register_profile(
    "stress", max_examples=STRESS_EXAMPLES, **_common)


def stress():
    """True under make stress."""
    return os.environ.get("IMAGEIO_STRESS", "") not in ("", "0")


def profile():
    return os.environ.get("HYPOTHESIS_PROFILE") or (
        "stress" if stress() else "check")


settings.load_profile(profile())
