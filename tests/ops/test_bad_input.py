"""Every bad input raises a Python exception naming the problem: never a crash, hang or garbage.

The cases run in a child process (bad_input_cases.py), so a segfault is a failed test, not a
dead test run; its per-case lines show how far it got.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bad_input_cases import CASES
from devices import DEVICES

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module", params=DEVICES)
def outcomes(request):
    env = dict(os.environ, GROUTER_TEST_DEVICE=request.param, GROUTER_CUDA_CHECKS="1")
    proc = subprocess.run(
        [sys.executable, str(HERE / "bad_input_cases.py")], capture_output=True, text=True, timeout=300,
        cwd=HERE, env=env,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["name"]] = r
    return proc, results


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises(name, outcomes):
    proc, results = outcomes
    assert name in results, (
        f"the case process died (exit {proc.returncode}) before finishing {name!r}:\n{proc.stderr[-3000:]}"
    )
    _, expected, word = CASES[name]
    r = results[name]
    assert r["raised"] is not None, f"{name}: no exception raised"
    assert expected.__name__ in r["mro"], f"{name}: raised {r['raised']}: {r['message']}"
    assert word.lower() in r["message"].lower(), f"{name}: message does not name the problem: {r['message']}"


def test_case_process_exits_cleanly(outcomes):
    proc, results = outcomes
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(results) == len(CASES)
