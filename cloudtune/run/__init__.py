"""The run lifecycle: orchestrator, state, watchdog, cost ledger and garbage collection."""
