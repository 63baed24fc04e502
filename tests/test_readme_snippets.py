"""Every ```python block of README.md runs as written.

Hub downloads are the one thing changed: a hub id in a snippet is replaced by a local checkpoint of the same
layout (``HUB_STAND_INS``: the published backbone -> the tiny upstream fixture, same code path through
``from_pretrained``). A snippet naming a hub id this table does not know fails, so a new snippet gets a stand-in
instead of a download in CI.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_HUB_ID = re.compile(r"""["']([A-Za-z0-9][\w.-]*/[\w.-]+)["']""")


def _hub_stand_ins(fixture_a: Path) -> dict[str, str]:
    return {"StreamFormer/OmniStream": str(fixture_a)}


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of each ```python block."""
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in _BLOCK.finditer(text)]


def test_readme_has_python_snippets():
    assert python_blocks(), "README.md has no ```python block: this test would check nothing"


@pytest.mark.parametrize(("line", "code"), python_blocks(), ids=[f"README.md:{n}" for n, _ in python_blocks()])
def test_readme_python_snippet_runs(line, code, fixture_a):
    stand_ins = _hub_stand_ins(fixture_a)
    unknown = [hub_id for hub_id in _HUB_ID.findall(code) if hub_id not in stand_ins and not Path(hub_id).exists()]
    assert not unknown, f"README.md:{line} downloads {unknown}: add a local stand-in to _hub_stand_ins"
    for hub_id, local in stand_ins.items():
        code = code.replace(f'"{hub_id}"', repr(local)).replace(f"'{hub_id}'", repr(local))
    torch.manual_seed(0)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme_snippet"})


def omnistream_commands() -> list[tuple[int, str]]:
    """(line number, command) of each `omnistream ...` command in the ```bash blocks (continuations joined,
    comments dropped, `a && b` split)."""
    text = README.read_text()
    commands = []
    for m in re.finditer(r"^```bash\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        first = text[: m.start()].count("\n") + 2
        for offset, line in enumerate(m.group(1).replace("\\\n", " ").split("\n")):
            for part in line.split("#")[0].split("&&"):
                if part.strip().startswith("omnistream "):
                    commands.append((first + offset, part.strip()))
    return commands


@pytest.mark.parametrize(
    ("line", "command"), omnistream_commands(), ids=[f"README.md:{n}" for n, _ in omnistream_commands()]
)
def test_readme_omnistream_commands_parse(line, command):
    """Commands that need data, GPUs or hours are not run here; their subcommands and options must exist."""
    import shlex

    from omnistream_cli.main import build_parser

    try:
        build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit as exc:
        pytest.fail(f"README.md:{line}: `{command}` is not a valid command line (exit {exc.code})")
