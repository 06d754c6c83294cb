"""Suite-wide configuration. Area fixtures live in tests/fixtures_*.py and are loaded as plugins."""

pytest_plugins = ["tests.fixtures_sandbox", "tests.fixtures_lm"]
