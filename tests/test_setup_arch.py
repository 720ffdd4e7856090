"""scripts/cuda_arch.sh: which GPU architectures setup.sh builds Horovod's CUDA kernels for.

Each case puts a fake ``nvcc`` (answering ``--list-gpu-arch``) and, where the node has GPUs, a fake
``nvidia-smi`` (answering ``--query-gpu=compute_cap``) first on PATH, without the real toolkit.
"""
import os
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cuda_arch.sh"
# What CUDA 12.4's nvcc lists (arch-specific 90a included, which a portable build leaves out).
NVCC_12 = [50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90, "90a"]
# CUDA 13 dropped everything below Turing.
NVCC_13 = [75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121]


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _select(tmp_path, nvcc_archs=NVCC_12, gpus=None, smi_fails=False, user=None, with_nvcc=True):
    """Run the selection; ``gpus``: the compute_cap lines nvidia-smi prints (None: no nvidia-smi)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if with_nvcc:
        listing = "\\n".join(f"compute_{a}" for a in nvcc_archs)
        _fake(bin_dir, "nvcc", f'[ "$1" = --list-gpu-arch ] && printf "{listing}\\n" && exit 0\nexit 1\n')
    if smi_fails:  # a driver without GPUs, or one too old for the compute_cap field
        _fake(bin_dir, "nvidia-smi", 'echo "No devices were found"; exit 6\n')
    elif gpus is not None:
        lines = "\\n".join(gpus)
        _fake(bin_dir, "nvidia-smi",
              f'[ "$1 $2" = "--query-gpu=compute_cap --format=csv,noheader" ] && printf "{lines}\\n" && exit 0\n'
              'echo "unexpected arguments: $*" >&2; exit 2\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    if user is not None:
        env["HOROVOD_BUILD_CUDA_CC_LIST"] = user
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    return proc.returncode, proc.stdout.strip(), proc.stderr


@pytest.mark.parametrize("gpus, expected", [(["8.0"], "80"), (["9.0"], "90"), (["8.0", "8.0"], "80"),
                                            (["9.0", "8.0"], "80,90")],
                         ids=["A100", "H100", "two_A100", "A100_and_H100"])
def test_gpus_on_the_node_decide(tmp_path, gpus, expected):
    rc, out, err = _select(tmp_path, gpus=gpus)
    assert (rc, out) == (0, expected), err
    assert "nvidia-smi" in err  # the choice and its origin are printed


def test_no_gpu_builds_every_arch_from_volta_that_nvcc_supports(tmp_path):
    rc, out, err = _select(tmp_path, gpus=None)
    assert (rc, out) == (0, "70,72,75,80,86,87,89,90"), err
    assert "no GPU visible" in err


def test_nvidia_smi_without_gpus_falls_back_to_nvcc_list(tmp_path):
    rc, out, err = _select(tmp_path, smi_fails=True, nvcc_archs=NVCC_13)
    assert (rc, out) == (0, ",".join(map(str, NVCC_13))), err


def test_user_value_wins_over_the_gpus(tmp_path):
    rc, out, err = _select(tmp_path, gpus=["8.0"], user="90,70")
    assert (rc, out) == (0, "70,90"), err
    assert "HOROVOD_BUILD_CUDA_CC_LIST" in err


def test_unsupported_user_value_is_a_clear_error(tmp_path):
    rc, out, err = _select(tmp_path, user="80,95")
    assert rc != 0 and out == ""
    assert "cannot compile for 95 (from HOROVOD_BUILD_CUDA_CC_LIST)" in err
    assert "it supports 50,52,53,60,61,62,70,72,75,80,86,87,89,90." in err


def test_user_value_with_a_dot_is_a_clear_error(tmp_path):
    rc, _, err = _select(tmp_path, user="8.0")
    assert rc != 0 and "'8.0' from HOROVOD_BUILD_CUDA_CC_LIST is not a compute capability" in err


def test_gpu_older_than_nvcc_supports_is_a_clear_error(tmp_path):
    # A V100 node with a CUDA 13 nvcc: no wheel built here could run on it.
    rc, _, err = _select(tmp_path, gpus=["7.0"], nvcc_archs=NVCC_13)
    assert rc != 0 and "cannot compile for 70 (from nvidia-smi: GPUs of compute capability 7.0)" in err


def test_missing_nvcc_is_a_clear_error(tmp_path):
    rc, _, err = _select(tmp_path, gpus=["8.0"], with_nvcc=False)
    assert rc != 0 and "nvcc is not on PATH" in err


def test_setup_sh_takes_its_arch_list_and_cache_key_from_the_selection():
    # setup.sh builds and caches Horovod: too heavy to run here, so check its wiring is intact.
    setup = (SCRIPT.parent / "setup.sh").read_text()
    assert 'source "$ROOT/scripts/cuda_arch.sh"' in setup and "CC_LIST=$(cuda_arch_list)" in setup
    assert "-cc-${CC_LIST//,/_}-" in setup.split("KEY=", 1)[1].splitlines()[0]
    assert subprocess.run(["bash", "-n", str(SCRIPT.parent / "setup.sh")]).returncode == 0
    assert os.access(SCRIPT, os.X_OK)
