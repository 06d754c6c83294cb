"""Language-model fixtures shared by the test suite (owned by the agents package)."""
