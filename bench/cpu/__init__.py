"""The CPU profile (`python -m bench`, `make bench`: its scenarios, table and plots) and the CPU studies beside it."""
