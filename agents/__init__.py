"""shoal agents."""
