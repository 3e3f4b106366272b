"""shoal policies."""
