"""Ray-only code: driver, worker actors, job entry point."""
