"""The README stays the truth: its commands parse, and CI runs its test command verbatim."""

import re
import shlex

import pytest

from kvcore.cli import build_parser
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


CLI_LINES = [line.split("#")[0].strip() for block in bash_blocks() for line in block.splitlines()
             if line.startswith("python -m kvcore") and "--help" not in line]


@pytest.mark.parametrize("line", CLI_LINES)
def test_every_cli_example_in_the_readme_parses(line):
    args = build_parser().parse_args(shlex.split(line)[3:])
    assert callable(args.run)


def test_ci_runs_the_readme_test_command():
    test_command = next(line for block in bash_blocks() for line in block.splitlines() if "pytest" in line)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_readme_images_exist():
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README):
        assert (ROOT / image).is_file(), image
