"""docs/cli.md is generated from the typer app (scripts/gen_cli_docs.py): it must be what the generator renders today,
and name every command and every flag of it. Cheap: imports the CLI, runs nothing."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cli.md"
FIX = "docs/cli.md is out of date: run `python scripts/gen_cli_docs.py` and commit it"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sections(text: str) -> dict[str, str]:
    """docs/cli.md's text under each `## `specx NAME`` heading, by command name."""
    parts = re.split(r"^## `specx ([\w-]+)`$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_cli_reference_is_up_to_date():
    assert DOC.read_text(encoding="utf-8") == _generator().render(), FIX


def test_every_command_and_flag_is_documented():
    gen = _generator()
    sections = _sections(DOC.read_text(encoding="utf-8"))
    found = gen.commands(gen.command_tree())
    assert {"export", "run", "chat", "bench", "info", "serve", "train-draft"} <= {name for name, _, _ in found}
    missing = []
    for name, command, ctx in found:
        section = sections.get(name)
        if section is None:
            missing.append(f"specx {name}")
            continue
        for param in gen.parameters(command, ctx):
            names = [param.name.upper()] if gen.is_argument(param) else gen.option_strings(param)
            missing += [f"specx {name} {n}" for n in names if f"`{n}`" not in section]
    assert not missing, f"{FIX}; missing: {', '.join(missing)}"


def test_the_reference_renders_help_defaults_and_choices():
    sections = _sections(DOC.read_text(encoding="utf-8"))
    run = sections["run"]
    assert re.search(r"^\| `--mode` \| one of `auto`, `autoregressive`, `speculative`, `staged`, `ngram` \| `auto` \|",
                     run, flags=re.MULTILINE)
    assert "| `--prompt` / `-p` | str | required |" in run
    assert "| `--port` | int, 1 to 65535 | `8000` |" in sections["serve"]
    assert "| `--cache` / `--no-cache` | flag | `--cache` |" in sections["train-draft"]
