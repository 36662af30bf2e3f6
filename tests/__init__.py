"""
Tests for gsmail, run with trial: C{python -m twisted.trial tests}.
"""

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test extra; only the property tests need it
    pass
else:
    # Deterministic and bounded, as Twisted's own suite does it.
    settings.register_profile(
        "gsmail",
        deadline=None,
        derandomize=True,
        max_examples=50,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.load_profile("gsmail")
