"""`specx bench`: plain decoding and every mode on a prompt set, or with --tune the search for the fastest mode and
tree, written into the bundle."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from specx.cli.common import Provider, app, capped_threads, numbers, tree_text, user_errors
from specx.errors import InvalidArgumentError
from specx.progress import terminal_progress


@app.command()
def bench(
    model: str = typer.Argument(..., help="Bundle directory, or a name under $SPECX_HOME."),
    prompts: Optional[Path] = typer.Option(None, help="Prompts: JSON lines {id, kind, prompt} or one text per line "
                                                     "(default: specx's built-in mixed set)."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N prompts."),
    modes: Optional[str] = typer.Option(None, help="Comma-separated modes (default: every mode the bundle supports)."),
    temperatures: str = typer.Option("0,1", help="Comma-separated temperatures (0 = greedy)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Tokens per generation (EOS ignored, so every run is as "
                                                            "long). Default 128; 64 with --tune."),
    provider: Provider = typer.Option(Provider.auto, help="Execution provider."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads (default: physical cores)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write every measurement to this file."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw speed-up and tau per mode and prompt kind to this "
                                                             "PNG (needs matplotlib: pip install 'specx[plot]')."),
    against: Optional[str] = typer.Option(None, help="Peers on the same prompts, in the same table: "
                                                     "transformers, llama.cpp, onnxruntime-genai (comma-separated; a "
                                                     "peer that is not installed is skipped with a note; "
                                                     "onnxruntime-genai: python -m specx.peers_genai setup)."),
    tune: bool = typer.Option(False, "--tune", help="Search mode, tree shape and adaptive-depth threshold on this "
                                                    "machine (first 8 prompts unless --limit) and write the fastest "
                                                    "into the bundle as the default of run, Generator and bench."),
    tree_budget: Optional[int] = typer.Option(None, help="Speculative modes: draft tokens verified per step."),
    tree_depth: Optional[int] = typer.Option(None, help="Speculative modes: tree depth."),
    tree_threshold: Optional[float] = typer.Option(None, help="Speculative modes: adaptive-depth threshold."),
    tree_floor: Optional[float] = typer.Option(None, help="Speculative modes: verify only nodes whose path "
                                                          "probability reaches this."),
) -> None:
    """Plain decoding and every decoding mode on a prompt set, back to back: tokens/s, speed-up, tau, draft calls,
    weight-bytes ratio, overhead, and whether greedy outputs were identical."""
    with user_errors():
        import os
        import platform

        import onnxruntime

        from specx.runtime import bench as b
        from specx.runtime.bundle import resolve_bundle_dir
        from specx.runtime.config import GenerationConfig, TreeConfig
        from specx.runtime.generator import Generator

        threads = capped_threads(threads)
        temps = numbers(temperatures, "--temperatures")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise InvalidArgumentError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        tree = TreeConfig(budget=tree_budget, depth=tree_depth, threshold=tree_threshold, floor=tree_floor)
        generator = Generator.load(resolve_bundle_dir(model), provider=provider.value, threads=threads)
        chosen = b.check_modes(generator, modes.split(",")) if modes else b.supported_modes(generator)
        machine = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "provider": generator.provider,
                   "onnxruntime": onnxruntime.__version__}
        if tune:
            _tune(generator, b.load_prompts(prompts, b.TUNE_PROMPTS if limit is None else limit), chosen, temps,
                  b.TUNE_TOKENS if max_new_tokens is None else max_new_tokens, machine)
            return
        config = GenerationConfig(max_new_tokens=b.BENCH_TOKENS if max_new_tokens is None else max_new_tokens,
                                  tree=tree)
        prompt_set = b.load_prompts(prompts, limit)
        typer.echo(f"specx bench: {len(prompt_set)} prompts x {len(temps)} temperatures, modes "
                   f"{', '.join(['autoregressive', *chosen])}, {config.max_new_tokens} tokens each", err=True)
        peers = []
        if against:
            from specx.peers import load_peers

            peers = load_peers(against.split(","), generator.bundle.manifest, threads,
                               lambda note: typer.echo(note, err=True))
        rows = b.run_bench(generator, prompt_set, chosen, temps, config,
                           lambda r: typer.echo(f"  {r.mode} T={r.temperature:g} {r.prompt}: {r.speedup:.2f}x",
                                                err=True),
                           peers)
        summary = b.summarise(rows)
        typer.echo(b.format_table(summary))
        if json_out:
            meta = {"bundle": str(generator.bundle.path), "provider": generator.provider, "threads": threads,
                    "machine": platform.machine(), "cores": os.cpu_count(),
                    "onnxruntime": onnxruntime.__version__, "max_new_tokens": config.max_new_tokens,
                    "tree": {k: v for k, v in config.to_overrides().items() if k.startswith("tree_") and v is not None}}
            json_out.write_text(b.rows_to_json(rows, summary, meta))
        if plot:
            b.plot(rows, plot)


def _tune(generator, prompt_set, modes, temperatures, new_tokens, machine) -> None:  # noqa: ANN001
    import datetime

    from specx.runtime import bench as b

    progress = terminal_progress()
    record = {}
    for temperature in temperatures:
        key = "sampling" if temperature > 0 else "greedy"
        typer.echo(f"specx bench --tune ({key}): {len(b.candidates(modes, temperature > 0, generator.draft_kind.chains_only))} candidates x "
                   f"{len(prompt_set)} prompts, {new_tokens} tokens each", err=True)
        best, speedup, _ = b.tune(generator, prompt_set, modes, temperature, new_tokens,
                                  lambda c, s: typer.echo(f"  {c.mode}{tree_text(asdict(c))}: {s:.2f}x", err=True),
                                  progress.bar)
        record[key] = {**b.tuning_record(best, speedup, len(prompt_set), new_tokens, machine),
                       "measured": datetime.date.today().isoformat(), "temperature": temperature}
        typer.echo(f"{key}: {best.mode}{tree_text(asdict(best))}: {speedup:.2f}x plain decoding (median over prompts)")
    b.write_tuning(generator.bundle.path, record)
    typer.echo(f"written to {generator.bundle.path / 'manifest.json'}: run, Generator and bench use it by default")
