"""Numerical cores (no I/O): DG constants and the spectral repair step."""
