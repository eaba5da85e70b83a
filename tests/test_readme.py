"""The README is the way in: what vpcnet is, the two commands, two hosts, where to go next. It must stay
short and true; the reference lives in docs/ (tests/test_docs.py checks those pages and every link)."""
import os
import re

REPO = os.path.join(os.path.dirname(__file__), "..")
README = os.path.join(REPO, "README.md")
MAX_LINES = 200


def readme() -> str:
    with open(README) as fh:
        return fh.read()


def test_the_readme_is_a_way_in_not_the_reference():
    assert len(readme().splitlines()) <= MAX_LINES, "move reference material into docs/"
    assert "| `VPCNET_SOCKET` |" not in readme(), "the settings table lives in docs/settings.md"


def test_the_two_commands_are_there():
    text = readme()
    assert "\nsudo sh -c 'python3 -m vpcnet.bootstrap && vpcnet serve'\n" in text
    assert "\nsudo python3 tests/run.py\n" in text
    assert os.path.exists(os.path.join(REPO, "tests", "run.py"))


def test_the_readme_says_the_default_provider_serves_one_host():
    text = readme()
    assert "serves one host" in text and "aliyun" in text and "aws" in text and "vpcnet lab" in text
    assert "other hosts' containers (through the VPC route)" not in text


def test_the_readme_leads_to_the_docs_and_to_uninstalling():
    text = readme()
    sections = re.findall(r"^## (.+)$", text, re.M)
    assert sections[0] == "The two commands" and sections[-1] == "Where to go next"
    assert "Uninstall" in sections
    assert "(docs/README.md)" in text.split("## Where to go next", 1)[1]
    assert "(docs/install.md#uninstall)" in text
