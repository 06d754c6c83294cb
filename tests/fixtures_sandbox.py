"""Sandbox fixtures shared by the test suite (owned by the sandbox package)."""
