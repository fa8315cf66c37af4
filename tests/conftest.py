"""Test configuration: 8 simulated CPU devices, warnings as errors (see pyproject.toml).

XLA_FLAGS must be set before JAX initialises its backends, so it is set here, at
import time of the first conftest, for every test module in the session.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_configure(config):
    # Warnings are errors (also set in pyproject.toml, kept here so a bare `pytest tests/x.py`
    # from another rootdir behaves the same).
    config.addinivalue_line("filterwarnings", "error")
