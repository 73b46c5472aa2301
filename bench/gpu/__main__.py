"""python -m bench.gpu: the GPU profile (bench/gpu/profile.py)."""

import sys

from .profile import cli

if __name__ == "__main__":
    sys.exit(cli())
