"""The engine: one repair in one process, as sub-packages that follow the data (docs/development.md):
config -> io -> plan -> output / run -> analysis, demo. Never imports Ray."""
