"""The `vpcnet` command as a whole: sub-command modules stand alone (none imports vpcnet.cli.main or
another sub-command)."""
from __future__ import annotations

import sys

import pytest
from conftest import run

from vpcnet.cli.main import COMMAND_MODULES


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_a_sub_command_module_imports_neither_main_nor_another_sub_command(module):
    """main imports the sub-commands dynamically; a sub-command importing main (or a sibling) would make
    a cycle or drag the other commands' imports into every process that runs it."""
    others = [m for m in COMMAND_MODULES if m != module]
    code = (f"import importlib, sys; importlib.import_module({module!r}); "
            f"print(sorted(m for m in {['vpcnet.cli.main', *others]!r} if m in sys.modules))")
    proc = run([sys.executable, "-c", code])
    assert proc.stdout.strip() == "[]", f"{module} imports {proc.stdout.strip()}"
