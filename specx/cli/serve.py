"""`specx serve`: an OpenAI-compatible HTTP server over a bundle (the serve extra; specx.server)."""

from __future__ import annotations

from typing import Optional

import typer

from specx.cli.common import Mode, Provider, app, needs_extra
from specx.cli.common import user_errors as _user_errors


@app.command()
def serve(
    model: str = typer.Argument(..., help="Bundle directory, or a name under $SPECX_HOME."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. The default serves this machine only; the "
                                               "server has no authentication."),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
    mode: Mode = typer.Option(Mode.auto, help="Decoding mode (auto: the bundle's tuned or best mode)."),
    max_queue: int = typer.Option(8, min=0, help="Requests that may wait while one runs; more are answered 429."),
    provider: Provider = typer.Option(Provider.auto, help="Execution provider."),
    threads: Optional[int] = typer.Option(None, min=1, help="ONNX Runtime intra-op threads (default: physical "
                                                            "cores)."),
    max_context: Optional[int] = typer.Option(None, min=1, help="Cap prompt + new tokens below the model's context."),
) -> None:
    """Serve a bundle over an OpenAI-compatible HTTP API: /v1/chat/completions and /v1/completions (streaming
    too), /v1/models, /health. One request runs at a time; the others wait in a bounded queue."""
    with _user_errors():
        with needs_extra("serve", "serve"):
            from specx.server.app import ServeOptions, serve as serve_bundle
        serve_bundle(ServeOptions(model, host, port, mode.value, max_queue, provider.value, threads, max_context))
