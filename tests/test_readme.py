"""The README is what a newcomer follows: its configuration table and commands must stay true."""
import os
import re

from vpcnet.config import SETTINGS, markdown_table

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def readme() -> str:
    with open(README) as fh:
        return fh.read()


def test_configuration_table_is_generated_from_the_settings():
    assert markdown_table() in readme(), "regenerate with: python3 -m vpcnet.config"
    for setting in SETTINGS:
        assert f"`{setting.env}`" in readme()


def test_the_two_commands_are_there():
    text = readme()
    assert "sudo sh -c 'python3 -m vpcnet.bootstrap && vpcnet serve'" in text
    assert "\npython3 -m pytest -q\n" in text


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(os.path.dirname(__file__), "..", ".ci", "run")) as fh:
        ci = fh.read()
    assert re.search(r"^python3 -m pytest -q$", ci, re.M)

