"""python -m bench [--quick] [--only NAME ...]: the CPU profile (bench/cpu/profile.py; `make bench` runs --quick)."""

import sys

from .cpu.profile import main

if __name__ == "__main__":
    sys.exit(main())
