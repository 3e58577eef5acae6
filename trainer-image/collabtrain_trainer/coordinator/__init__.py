"""The coordinator: membership, rounds, the step counter, and its HTTP service."""
