"""The planning model: which tensor gets which treatment, decided from headers only."""
