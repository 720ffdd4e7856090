"""requirements.txt is the one pin list: environment.yml and setup.py must agree with it."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [l.split("#", 1)[0].strip() for l in lines if l.split("#", 1)[0].strip()]


def test_every_requirement_is_pinned_exactly():
    for pin in _requirements():
        assert "==" in pin, f"requirements.txt: {pin!r} is not an exact pin"


def test_environment_yml_pip_section_equals_requirements():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1
    assert sorted(pip_sections[0]) == sorted(_requirements())
    conda_python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python=")]
    assert conda_python == ["python=3.11"]


def test_torch_and_torchvision_pinned_together():
    pins = dict(p.split("==") for p in _requirements())
    assert (pins["torch"], pins["torchvision"]) == ("2.14.1", "0.29.1")
