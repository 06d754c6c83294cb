"""Suite-wide configuration. Area fixtures live in tests/fixtures_*.py and are loaded as plugins.

A test that uses a sandbox fixture (`local_sandbox`, `sandbox_backends`, directly or through another fixture) is
marked `sandbox` here; tests that start a sandbox themselves carry the marker in their module. So
`pytest -m "not sandbox and not slow"` runs the pure unit tests.
"""

import pytest

pytest_plugins = ["tests.fixtures_sandbox", "tests.fixtures_lm"]

SANDBOX_FIXTURES = frozenset({"local_sandbox", "sandbox_backends"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SANDBOX_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.sandbox)
