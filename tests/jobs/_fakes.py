"""Fake scheduler environments for the job scripts: a stub scontrol, PBS node files, a stub launcher.

The job scripts run for real under bash; only the scheduler around them is faked. Environments are
built from scratch (never copied from os.environ), so a developer's own SLURM_* or PBS_* variables
cannot change what the tests see.
"""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
JOBS = REPO_ROOT / "jobs"
SBATCH = JOBS / "slurm" / "megdet.sbatch"
PBS = JOBS / "pbs" / "megdet.pbs"
LOCAL = JOBS / "local" / "run.sh"
SUBMIT_TABLE3 = JOBS / "submit_table3.sh"

# Answers exactly the one query the launch makes for node[01-04]; records every other call
# (e.g. `requeue 4242`) in $FAKE_SCONTROL_LOG.
_SCONTROL = """#!/bin/sh
if [ "$1" = show ] && [ "$2" = hostnames ] && [ "$3" = 'node[01-04]' ]; then
    printf 'node01\\nnode02\\nnode03\\nnode04\\n'
    exit 0
fi
[ "$1" = show ] && { echo "stub scontrol: unknown node list $3" >&2; exit 1; }
echo "$*" >> "$FAKE_SCONTROL_LOG"
"""

# Stands in for the job's Python in the check before launching (`python -c 'import hvd_megdet, horovod'`).
_PYTHON = """#!/bin/sh
exit 0
"""

# Stands in for srun as a one-task job step on this node: records its options, runs the command.
_SRUN = """#!/bin/bash
echo "$*" >> "$FAKE_SRUN_LOG"
echo $$ > "$FAKE_SRUN_LOG.pid"
while [[ $1 == -* ]]; do shift; done
exec "$@"
"""

# Stands in for horovodrun/mpirun/srun: records argv and environment, then either exits with
# $FAKE_EXIT or runs like a launcher whose ranks are training: until rank 0 would see the stop file
# OUTPUT_DIR/STOP (recorded as "STOP <its text>"; the ranks save and exit 0, as after a stop through
# the file alone, and the launcher lingers $FAKE_LINGER seconds winding down), or until a TERM reaches
# the launcher itself (recorded as "TERM").
_LAUNCHER = """#!/bin/bash
log=$FAKE_LAUNCHER_LOG
printf '%s\\n' "$@" > "$log.argv"
env > "$log.env"
trap 'echo TERM >> "$log.events"; exit 143' TERM
echo started >> "$log.events"
[ -n "${FAKE_EXIT:-}" ] && exit "$FAKE_EXIT"
for arg in "$@"; do case $arg in train.output_dir=*) stop=${arg#*=}/STOP ;; esac; done
while [ ! -f "$stop" ]; do sleep 0.05; done
echo "STOP $(cat "$stop")" >> "$log.events"
rm -f "$stop"
sleep "${FAKE_LINGER:-0}"
exit 0
"""


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


class FakeCluster:
    """A temporary directory holding a stub bin/, a config, a shard directory and logs."""

    def __init__(self, root: Path):
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        _write_exe(self.bin / "scontrol", _SCONTROL)
        self.launcher = _write_exe(self.bin / "fake_launcher", _LAUNCHER)
        _write_exe(self.bin / "python", _PYTHON)
        _write_exe(self.bin / "srun", _SRUN)
        self.srun_log = root / "srun.log"
        self.scontrol_log = root / "scontrol.log"
        self.launcher_log = root / "launcher"
        self.config = root / "tiny.yaml"
        self.config.write_text("# the job scripts only check that the config exists\n")
        self.data = self.make_shards(root / "shards")
        self.output = root / "out"

    @staticmethod
    def make_shards(path: Path, manifest: str = '{"shards": ["part-0.h5"]}') -> Path:
        path.mkdir(parents=True)
        (path / "manifest.json").write_text(manifest)
        (path / "part-0.h5").write_bytes(bytes(range(256)) * 4)
        return path

    def nodefile(self, hosts: list[str]) -> Path:
        path = self.root / "PBS_NODEFILE"
        path.write_text("".join(f"{h}\n" for h in hosts))
        return path

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment: stubs first on PATH, the checkout as the submit directory."""
        env = {
            "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.root),
            "SLURM_SUBMIT_DIR": str(REPO_ROOT),
            "PBS_O_WORKDIR": str(REPO_ROOT),
            "FAKE_SCONTROL_LOG": str(self.scontrol_log),
            "FAKE_LAUNCHER_LOG": str(self.launcher_log),
            "CONFIG": str(self.config),
            "DATA_PATH": str(self.data),
            "OUTPUT_DIR": str(self.output),
            "FAKE_SRUN_LOG": str(self.srun_log),
            "MEGDET_VENV": "",  # jobs/env.sh activates no venv: the stubs above stay first on PATH
        }
        env.update(extra)
        return env

    def launcher_argv(self) -> list[str]:
        return Path(f"{self.launcher_log}.argv").read_text().splitlines()

    def launcher_env(self) -> dict[str, str]:
        lines = Path(f"{self.launcher_log}.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def launcher_events(self) -> list[str]:
        path = Path(f"{self.launcher_log}.events")
        return path.read_text().splitlines() if path.exists() else []


def run_script(script: Path, env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def dry_run(script: Path, env: dict[str, str], *args: str) -> list[list[str]]:
    """Run ``script`` with MEGDET_DRY_RUN=1 and return the printed command lines, split into words."""
    proc = run_script(script, {**env, "MEGDET_DRY_RUN": "1"}, *args)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]
