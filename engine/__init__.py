"""Single-process engine: checkpoints, planning, repair step, manifest."""
