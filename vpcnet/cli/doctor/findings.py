"""What every doctor check shares: the Finding it returns, the Context it reads (the configuration, the
engine, and the state as the first check loaded it), and the two renderings of the findings: one line per
finding for a person, one JSON document for a program."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vpcnet.state.store import Store

HTTP_TIMEOUT = 3.0


@dataclass
class Finding:
    check: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"ok      {self.check}: {self.detail}"
        return f"PROBLEM {self.check}: {self.detail}" + (f"; fix: {self.fix}" if self.fix else "")


def ok(check: str, detail: str) -> Finding:
    return Finding(check, True, detail)


def problem(check: str, detail: str, fix: str) -> Finding:
    return Finding(check, False, detail, fix)


@dataclass
class Context:
    """What the checks look at. networks, endpoints and claims stay empty until the state check has read
    them (it runs first), so every later check sees the same snapshot of the state."""
    config: Any
    docker_socket: str
    plugin: dict | None = None          # `docker plugin inspect` of a managed plugin, when checking one
    store: Store | None = None
    networks: list = field(default_factory=list)
    endpoints: list = field(default_factory=list)
    claims: list = field(default_factory=list)

    @property
    def driver_name(self) -> str:
        return self.plugin["Name"] if self.plugin else self.config.driver_name

    def modes(self) -> set[str]:
        return {n.mode for n in self.networks} or {"bridge"}


class Checks:
    """A domain's checks: each `check_*` method returns Findings; its name without `check_` names the
    check when it cannot run."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.config = ctx.config


def render_text(findings: list[Finding], verbose: bool = False) -> str:
    """The problems (every finding with verbose), then a one-line summary."""
    problems = [f for f in findings if not f.ok]
    lines = [f.line() for f in findings if verbose or not f.ok]
    lines.append(f"vpcnet doctor: {len(problems)} problem(s), {len(findings) - len(problems)} check(s) passed")
    return "\n".join(lines)


def render_json(findings: list[Finding]) -> str:
    return json.dumps({"ok": all(f.ok for f in findings), "findings": [asdict(f) for f in findings]}, indent=2)
