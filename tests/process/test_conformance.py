"""Runs the data-driven conformance suite (tests/support/conformance/*.jsonl) against `python -m worker`."""

import copy
import shlex
import os
import sys
from pathlib import Path

import pytest

from tests.support.conformance.runner import CaseFailure, Runner, load_cases

HERE = Path(__file__).resolve().parents[1] / "support" / "conformance"
CASES = load_cases(sorted(HERE.glob("*.jsonl")))


@pytest.fixture(scope="module")
def runner(llama_dir):
    """The suite against the worker (tests/process/test_distributed.py runs it over two ranks too)."""
    cmd = shlex.split(os.environ.get("MLX_WORKER_CMD", "")) or [sys.executable, "-m", "worker"]
    r = Runner(cmd, str(llama_dir), cwd=str(HERE.parent.parent))
    yield r
    r.close()


def test_enough_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case(runner, case):
    try:
        runner.run_case(copy.deepcopy(case))
    except CaseFailure as e:
        pytest.fail(str(e), pytrace=False)
