"""The GPU profiles: random-weight models shaped like real ones, run on a GPU machine (bench/README.md)."""
