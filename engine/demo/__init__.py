"""The self-contained demo and the synthetic checkpoint pairs it (and the benchmarks) repair."""
