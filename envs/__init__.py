"""shoal envs."""
