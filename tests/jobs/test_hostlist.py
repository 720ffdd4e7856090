"""jobs/hostlist.py: Slurm hostlist expressions expanded as `scontrol show hostnames` prints them."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "jobs" / "hostlist.py"


def _load():
    # jobs/ is not a package (it ships scripts, not library code), so load the file by path.
    spec = importlib.util.spec_from_file_location("jobs_hostlist", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hostlist = _load()


@pytest.mark.parametrize("expr, expected", [
    ("node[01-04]", ["node01", "node02", "node03", "node04"]),
    ("login", ["login"]),
    ("a1,b2", ["a1", "b2"]),
    ("gpu[08-10],login", ["gpu08", "gpu09", "gpu10", "login"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),               # no padding when lo has none
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),      # width of lo
    ("c[1,3,5-6]-ib", ["c1-ib", "c3-ib", "c5-ib", "c6-ib"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),    # product, last group fastest
    ("x[1-2],y[7],z", ["x1", "x2", "y7", "z"]),
    (" node[1-2] ", ["node1", "node2"]),
])
def test_expand_hostlist(expr, expected):
    assert hostlist.expand_hostlist(expr) == expected


@pytest.mark.parametrize("expr, message", [
    ("node[01-04", "unbalanced '['"),
    ("node01-04]", "unbalanced ']'"),
    ("node[[1-2]]", "nested"),
    ("node[4-1]", "runs backwards"),
    ("node[a-b]", "bad range"),
    ("", "empty"),
])
def test_bad_hostlists_name_the_problem(expr, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        hostlist.expand_hostlist(expr)


def test_command_line_prints_one_host_per_line():
    out = subprocess.run([sys.executable, str(SCRIPT), "node[01-03],x"], capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines() == ["node01", "node02", "node03", "x"]


def test_command_line_error_exit_status():
    proc = subprocess.run([sys.executable, str(SCRIPT), "node[1-"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "node[1-" in proc.stderr
