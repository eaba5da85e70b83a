"""The `vpcnet` command as a whole: sub-command modules stand alone (none imports vpcnet.cli.main or
another sub-command), and `vpcnet completion` prints scripts a real bash accepts and completes with."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import run

from vpcnet.cli.main import COMMAND_MODULES

COMMAND = [sys.executable, "-m", "vpcnet.cli"]


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_a_sub_command_module_imports_neither_main_nor_another_sub_command(module):
    """main imports the sub-commands dynamically; a sub-command importing main (or a sibling) would make
    a cycle or drag the other commands' imports into every process that runs it."""
    others = [m for m in COMMAND_MODULES if m != module]
    code = (f"import importlib, sys; importlib.import_module({module!r}); "
            f"print(sorted(m for m in {['vpcnet.cli.main', *others]!r} if m in sys.modules))")
    proc = run([sys.executable, "-c", code])
    assert proc.stdout.strip() == "[]", f"{module} imports {proc.stdout.strip()}"


def test_completion_bash_is_valid_bash_naming_every_sub_command():
    script = run([*COMMAND, "completion", "bash"]).stdout
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    for command in ("serve", "status", "doctor", "routes", "install-systemd", "completion"):
        assert command in script


def test_completion_in_a_real_bash_offers_doctor_for_do():
    cases = {("do",): "doctor", ("routes", ""): "list sync release gc", ("doctor", "--pl"): "--plugin"}
    for words, expected in cases.items():
        line = " ".join(["vpcnet", *words])
        shell = (f"source <({' '.join(COMMAND)} completion bash); COMP_LINE='{line}'; COMP_POINT={len(line)}; "
                 f"COMP_WORDS=(vpcnet {' '.join(repr(w) for w in words)}); COMP_CWORD={len(words)}; "
                 '_shtab_vpcnet; echo "${COMPREPLY[@]}"')
        assert run(["bash", "-c", shell]).stdout.strip() == expected, line


def test_completion_zsh_is_a_compdef_for_vpcnet():
    script = run([*COMMAND, "completion", "zsh"]).stdout
    assert script.startswith("#compdef vpcnet") and "doctor" in script


def test_completion_refuses_an_unknown_shell():
    proc = run([*COMMAND, "completion", "tcsh"], check=False)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
