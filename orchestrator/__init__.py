"""shoal orchestrator."""
