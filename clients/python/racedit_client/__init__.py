"""racedit_client: the Python SDK of the racedit service (no torch)."""
