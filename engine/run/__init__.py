"""Executing a plan: inputs, the run session and its phases, resume, the repair step, calibration."""
