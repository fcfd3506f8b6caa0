"""The `specx` command line: one typer app (specx.cli.common), one module per command group.

    build     export, train-draft
    generate  run, chat
    bench     bench (and bench --tune)
    info      info
    serve     serve

Every module registers its commands on the app when imported; the runtime and the exporter load lazily inside the
commands, so that `specx run` imports neither torch nor the export stack.
"""

from __future__ import annotations

# Each module registers its commands on the app, in this order (`specx --help` lists them so).
from specx.cli import build, generate, bench, info  # noqa: F401,I001
from specx.cli import serve  # noqa: F401
from specx.cli.build import export, train_draft_command  # noqa: F401
from specx.cli.common import app
from specx.cli.generate import chat, run, speedup_line  # noqa: F401


def main() -> None:
    app()
