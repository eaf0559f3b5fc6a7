"""The install files agree with each other and with the README.

``requirements.txt`` (CPU torch; what Streamlit Community Cloud installs) and ``requirements-gpu.txt``
(PyPI's CUDA build of the same torch) both take the app's other pins from ``requirements-app.txt``; the
dev file adds triton at the version the CUDA torch requires; the README's commands name files that
exist and the versions they pin.
"""

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
COMMUNITY_CLOUD = {"python_version": "3.12", "platform_system": "Linux", "platform_machine": "x86_64"}


def read_requirements(path: Path) -> list[Requirement]:
    """Every requirement of a pip requirements file, ``-r`` includes resolved (relative to the file)."""
    found = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            found += read_requirements(path.parent / line[3:].strip())
        else:
            found.append(Requirement(line))
    return found


def by_name(requirements: list[Requirement], name: str) -> list[Requirement]:
    return [r for r in requirements if r.name == name]


def pinned(requirement: Requirement) -> str:
    """The version a requirement pins: ``==X`` or the version in a wheel URL's file name."""
    if requirement.url:
        return re.search(r"-(\d+(?:\.\d+)+)(?:%2B|\+)", requirement.url).group(1)
    (spec,) = requirement.specifier
    assert spec.operator == "==", requirement
    return spec.version


APP = read_requirements(ROOT / "requirements-app.txt")
CPU = read_requirements(ROOT / "requirements.txt")
GPU = read_requirements(ROOT / "requirements-gpu.txt")
DEV = read_requirements(ROOT / "requirements-dev.txt")
TORCH = pinned(by_name(GPU, "torch")[0])
TRITON = pinned(by_name(GPU, "triton")[0])


def test_every_file_pins_the_same_torch():
    versions = {pinned(r) for r in by_name(CPU, "torch") + by_name(GPU, "torch") + by_name(DEV, "torch")}
    assert versions == {TORCH}


def test_the_app_pins_live_in_one_shared_file():
    app = {str(r) for r in APP}
    assert not by_name(APP, "torch")
    assert {str(r) for r in CPU if r.name != "torch"} == app
    assert {str(r) for r in GPU if r.name not in {"torch", "triton"}} == app
    assert all(r.specifier and next(iter(r.specifier)).operator == "==" for r in APP), "pin every app package"


@pytest.mark.parametrize(("environment", "cpu_wheel"), [
    (COMMUNITY_CLOUD, True),
    ({**COMMUNITY_CLOUD, "python_version": "3.11"}, False),
    ({**COMMUNITY_CLOUD, "platform_system": "Darwin", "platform_machine": "arm64"}, False),
])
def test_requirements_txt_takes_the_cpu_wheel_exactly_where_community_cloud_runs(environment, cpu_wheel):
    applies = [r for r in by_name(CPU, "torch") if r.marker is None or r.marker.evaluate(environment)]
    assert len(applies) == 1
    (torch,) = applies
    assert bool(torch.url) == cpu_wheel
    if cpu_wheel:
        assert "/whl/cpu/" in torch.url
        assert f"cp{environment['python_version'].replace('.', '')}" in torch.url


def test_the_gpu_route_has_no_cpu_wheel():
    (torch,) = by_name(GPU, "torch")
    assert torch.url is None
    assert torch.marker is None
    assert "whl/cpu" not in (ROOT / "requirements-gpu.txt").read_text()


def test_triton_is_pinned_alike_for_gpu_users_and_tests_and_never_for_the_cloud():
    assert [pinned(r) for r in by_name(DEV, "triton")] == [TRITON]
    assert not by_name(CPU, "triton")
    for triton in by_name(DEV, "triton") + by_name(GPU, "triton"):  # triton ships Linux wheels only
        assert triton.marker.evaluate({"platform_system": "Linux"})
        assert not triton.marker.evaluate({"platform_system": "Darwin"})


def test_readme_names_exactly_the_requirements_files_that_exist():
    named = set(re.findall(r"requirements[\w-]*\.txt", README))
    present = {p.name for p in ROOT.glob("requirements*.txt")}
    assert named == present


def test_readme_run_commands_install_the_cpu_and_the_gpu_files():
    run_the_app = README.split("## Run the app", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", run_the_app, flags=re.S)
    assert "pip install -r requirements.txt && streamlit run app.py\n" in commands
    assert "pip install -r requirements-gpu.txt && streamlit run app.py\n" in commands


def test_readme_states_the_pinned_versions():
    assert set(re.findall(r"torch(?:==| )(\d+\.\d+\.\d+)", README)) == {TORCH}
    assert set(re.findall(r"triton(?:==| )(\d+\.\d+\.\d+)", README)) == {TRITON}
