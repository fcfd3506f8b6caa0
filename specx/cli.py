"""The `specx` command line: export, run, info."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Iterator, Optional

import typer

from specx.errors import InvalidArgumentError, SpecxError
from specx.runtime.ngram import DEFAULT_SAMPLE_TOKENS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Export Hugging Face models to ONNX bundles and run speculative decoding on ONNX Runtime.")


class Mode(str, Enum):
    auto = "auto"
    autoregressive = "autoregressive"
    speculative = "speculative"
    staged = "staged"
    ngram = "ngram"


class DraftChoice(str, Enum):
    auto = "auto"
    sample = "sample"
    top = "top"


class Provider(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class DType(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"
    int4 = "int4"
    fp16_int8 = "fp16-int8"
    fp16_int4 = "fp16-int4"


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn errors a user can fix into one line on stderr and exit code 1 (no traceback)."""
    try:
        yield
    except SpecxError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted")


def _threads(threads: Optional[int]) -> Optional[int]:
    """--threads, lowered to this machine's cores with a warning (100,000 hung)."""
    from specx.runtime.session import cap_threads

    if threads is not None and threads < 1:
        raise InvalidArgumentError(f"--threads must be >= 1, got {threads}")
    threads, lowered = cap_threads(threads)
    if lowered:
        typer.echo(f"warning: {lowered}", err=True)
    return threads


def _numbers(text: str, flag: str) -> list[float]:
    """A comma-separated list of numbers (--temperatures 0,0.7,1)."""
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise InvalidArgumentError(f"{flag} takes comma-separated numbers like 0,1; got {text!r}") from None


@app.command()
def export(
    source: str = typer.Argument(..., help="Hugging Face hub id (gpt2-large), local model directory, or .gguf file."),
    draft: Optional[str] = typer.Option(None, help="Draft model source, or 'none'. Default: the family's draft "
                                                   "(gpt2 -> distilgpt2); required for other families."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Bundle directory. Default: $SPECX_HOME/<name>."),
    dtype: DType = typer.Option(DType.auto, help="Graph precision: fp16 for CUDA, fp32 for CPU (auto picks); int8 / "
                                                 "int4: weight-only quantized (MatMulNBits, lm_head included) with "
                                                 "fp32 activations, for CPU; fp16-int8 / fp16-int4: the same with "
                                                 "fp16 activations, for CUDA."),
    opset: int = typer.Option(18, help="ONNX opset (18 or newer)."),
    ngram_tokens: int = typer.Option(DEFAULT_SAMPLE_TOKENS, help="Tokens to sample from the draft (temperature 1.5) for a "
                                                  "static n-gram table; default 0: staged and ngram modes count the "
                                                  "prompt and output only (measured faster)."),
    ngram_corpus: Optional[list[Path]] = typer.Option(None, help="Text file(s) to add to the n-gram table."),
) -> None:
    """Export a target model (and its draft) into one bundle: graphs, tokenizer, manifest."""
    with _user_errors():
        try:
            from specx.exporter.pipeline import ExportRequest, export_bundle
        except ImportError as exc:
            raise SpecxError(f"export needs the export extra ({exc.name} is missing): pip install 'specx[export]'") from exc
        progress, bars = _progress_reporters()
        request = ExportRequest(source, draft, output, dtype.value, opset, ngram_tokens, tuple(ngram_corpus or ()))
        path = export_bundle(request, progress, bars)
        typer.echo(str(path))


@app.command("train-draft")
def train_draft_command(
    model: str = typer.Argument(..., help="Bundle directory, or a name under $SPECX_HOME."),
    tokens: int = typer.Option(700_000, help="Tokens of training text the target writes itself (SmolLM2-135M on a "
                                             "2-core CPU with AMX: within the hour in all; a GPU writes far more)."),
    corpus: Optional[list[Path]] = typer.Option(None, help="Text file(s) to train on as well (teacher-forced)."),
    draft_vocab: int = typer.Option(8192, help="Draft vocabulary: the target's most used tokens."),
    epochs: float = typer.Option(8.0, help="Passes over the training text."),
    draft_layers: int = typer.Option(1, help="Decoder layers in the draft (each adds about a layer's cost to a "
                                             "draft call)."),
    hard_label: float = typer.Option(0.0, help="Share of each position's label moved onto the target's top token "
                                               "(0: the target's distribution alone; 1: its top token alone)."),
    device: str = typer.Option("auto", help="Where torch trains: auto, cpu or cuda."),
    seed: int = typer.Option(0, help="Seed for data and initialisation."),
    draft_dtype: str = typer.Option("int8", help="Draft graph weights: int8 or int4 weight-only quantized "
                                                 "(MatMulNBits, as --dtype int8|int4 of export), or fp32. int8 "
                                                 "measured half the draft's cost of fp32 at the same tau."),
    cache: bool = typer.Option(True, help="Keep the training data under $SPECX_HOME/train-data, so that training "
                                          "again (other --epochs or --draft-vocab) skips writing it."),
) -> None:
    """Train a feature draft for the bundle's target (self-distillation, offline) and put it in the bundle."""
    with _user_errors():
        try:
            from specx.drafttrain.pipeline import TrainDraftRequest, train_draft, training_summary
        except ImportError as exc:
            raise SpecxError(f"train-draft needs the export extra ({exc.name} is missing): "
                             "pip install 'specx[export]'") from exc
        from specx.runtime.bundle import resolve_bundle_dir

        bits = {"fp32": None, "int8": 8, "int4": 4}.get(draft_dtype, -1)
        if bits == -1:
            raise SpecxError(f"unknown --draft-dtype {draft_dtype!r}; use fp32, int8 or int4")
        step, bars = _progress_reporters()
        request = TrainDraftRequest(resolve_bundle_dir(model), tokens, tuple(corpus or ()), draft_vocab, device, seed,
                                    epochs, cache_data=cache, draft_bits=bits, draft_layers=draft_layers,
                                    hard_label=hard_label)
        result = train_draft(request, step, bars)
        typer.echo(f"{result.bundle}: {training_summary(result.training)}; "
                   f"{result.training['total_seconds'] / 60:.1f} minutes")


def _progress_reporters():
    """(step, bars): a spinner for steps without a count, a bar with count and ETA for those with one."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = Console(stderr=True)

    @contextlib.contextmanager
    def step(name: str) -> Iterator[None]:
        with console.status(f"{name}..."):
            yield
        console.print(f"[green]done[/green] {name}")

    class Bar:
        def __init__(self, name: str, total: int):
            self.name = name
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)
            self.task = self.progress.add_task(name, total=total)
            self.progress.start()

        def update(self, n: int = 1) -> None:
            self.progress.advance(self.task, n)

        def close(self) -> None:
            self.progress.stop()

    return step, Bar


CHAT_CACHE_TOKENS = 4096  # positions `specx chat` reserves up front (capped by the model's context)


def speedup_line(mode_stats, plain_stats, identical: bool) -> str:
    """One line: what the mode gained over plain decoding of the same prompt, measured just now."""
    ratio = mode_stats.tokens_per_second / plain_stats.tokens_per_second if plain_stats.tokens_per_second else 0.0
    same = "identical output" if identical else "output differs (sampling draws differ; the distribution is the same)"
    return (f"[{mode_stats.mode} vs plain decoding on this prompt: {ratio:.2f}x ({mode_stats.tokens_per_second:.1f} vs "
            f"{plain_stats.tokens_per_second:.1f} tokens/s), {same}]")


@app.command()
def run(
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    model: str = typer.Option("gpt2-large", help="Bundle directory, or a name under $SPECX_HOME."),
    max_new_tokens: int = typer.Option(128, help="Number of tokens to generate at most."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples."),
    top_k: int = typer.Option(0, help="Sample among the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold (1 = off)."),
    seed: Optional[int] = typer.Option(None, help="Random seed, for reproducible sampling."),
    mode: Mode = typer.Option(Mode.auto, help="Decoding mode (auto picks the best the bundle supports)."),
    provider: Provider = typer.Option(Provider.auto, help="Execution provider."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past the end-of-sequence token."),
    tree_budget: Optional[int] = typer.Option(None, help="Speculative: draft tokens the target verifies per step."),
    tree_depth: Optional[int] = typer.Option(None, help="Speculative: tree depth = draft calls per step at most."),
    tree_threshold: Optional[float] = typer.Option(None, help="Speculative: stop drafting a step once the best path "
                                                              "probability falls below this (0 = fixed depth; default "
                                                              "0.1, 0.2 greedy with a trained draft, 0.5 with "
                                                              "--draft-choice top)."),
    tree_floor: Optional[float] = typer.Option(None, help="Speculative: verify only the tree nodes whose path "
                                                          "probability reaches this, so a wide tree shrinks to its "
                                                          "likely nodes (default 0.05 greedy with a trained draft, "
                                                          "else 0 = every node)."),
    max_context: Optional[int] = typer.Option(None, help="Cap prompt + new tokens (default: the model's context); "
                                                         "bounds the KV cache's memory."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads (default: physical cores)."),
    chat: bool = typer.Option(False, "--chat", help="Format the prompt as a user message with the bundle's chat "
                                                    "template (instruct models)."),
    draft_choice: DraftChoice = typer.Option(DraftChoice.auto, help="Sampling with a draft model: 'sample' draws "
                                             "its proposals from its distribution (faster; auto), 'top' takes its "
                                             "top tokens (a seed then gives plain decoding's exact tokens)."),
    compare: bool = typer.Option(False, "--compare", help="Then decode the same prompt plainly (autoregressive) and "
                                                          "print the speed-up the mode gave on this machine."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
) -> None:
    """Generate text from a bundle, streaming it as it is decided."""
    with _user_errors():
        from specx.runtime.bundle import resolve_bundle_dir
        from specx.runtime.generator import Generator

        generator = Generator.load(resolve_bundle_dir(model), provider=provider.value, max_context=max_context,
                                   threads=_threads(threads))
        stream = generator.stream(prompt, max_new_tokens=max_new_tokens, mode=mode.value, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed, ignore_eos=ignore_eos,
                                  tree_budget=tree_budget, tree_depth=tree_depth, tree_threshold=tree_threshold,
                                  chat=chat, draft_choice=draft_choice.value, tree_floor=tree_floor)
        for piece in stream:
            if not as_json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        result = stream.result
        if result is None:
            raise SpecxError("generation ended without a result")
        if as_json:
            typer.echo(json.dumps({"text": result.text, "tokens": result.tokens, "stats": result.stats.to_dict()}))
            return
        s = result.stats
        sys.stdout.write("\n")
        sys.stdout.flush()
        tau = f", {s.tokens_per_target_call:.2f} tokens/target call" if s.mode != "autoregressive" else ""
        typer.echo(f"[{s.new_tokens} tokens, {s.tokens_per_second:.1f} tokens/s, mode {s.mode}, "
                   f"provider {s.provider}{tau}]", err=True)
        if compare:
            plain = generator.generate(prompt, max_new_tokens=max_new_tokens, mode="autoregressive",
                                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                       ignore_eos=ignore_eos, chat=chat)
            typer.echo(speedup_line(s, plain.stats, result.tokens == plain.tokens), err=True)


@app.command()
def chat(
    model: str = typer.Argument(..., help="Bundle directory, or a name under $SPECX_HOME (needs a chat template)."),
    system: Optional[str] = typer.Option(None, help="A system message that opens the conversation."),
    max_new_tokens: int = typer.Option(256, help="Tokens per answer at most."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples."),
    seed: Optional[int] = typer.Option(None, help="Random seed, for reproducible sampling."),
    mode: Mode = typer.Option(Mode.auto, help="Decoding mode (auto picks the best the bundle supports)."),
    provider: Provider = typer.Option(Provider.auto, help="Execution provider."),
) -> None:
    """Talk to an instruct model: each answer streams as it is decided; earlier turns stay in the KV cache."""
    with _user_errors():
        from specx.runtime.bundle import resolve_bundle_dir
        from specx.runtime.generator import Generator

        generator = Generator.load(resolve_bundle_dir(model), provider=provider.value)
        messages = [{"role": "system", "content": system}] if system else []
        options = dict(max_new_tokens=max_new_tokens, mode=mode.value, temperature=temperature, seed=seed)
        generator.stream(messages + [{"role": "user", "content": "?"}], **options)  # checks all, runs nothing
        generator.reserve(min(generator.max_positions, CHAT_CACHE_TOKENS))  # turns reuse it without reallocation
        typer.echo("specx chat: type a message; /exit or end of input quits.", err=True)
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if line.strip() in ("/exit", "/quit"):
                break
            if not line.strip():
                continue
            messages, prompt = _chat_prompt(generator, [*messages, {"role": "user", "content": line}], max_new_tokens)
            if prompt is None:
                continue
            stream = generator.stream(prompt, reuse_cache=True, **options)
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            result = stream.result
            if result is None:
                raise SpecxError("generation ended without a result")
            messages.append({"role": "assistant", "content": result.text})
            s = result.stats
            typer.echo(f"[{s.new_tokens} tokens, {s.tokens_per_second:.1f} tokens/s, {s.reused_prompt_tokens} of "
                       f"{s.prompt_tokens} prompt tokens reused from the cache]", err=True)


def _chat_prompt(generator, messages: list[dict], answer_tokens: int) -> tuple[list[dict], Optional[list[int]]]:
    """The conversation to keep and the prompt ids of its next answer: the oldest turns dropped (the system message
    kept) until prompt and answer fit the context, said on stderr. A message that fails to render, or does not fit
    even alone, is not sent: (the conversation without it, None), and the session goes on."""
    from specx.runtime.chat import fit_conversation

    limit = generator.max_positions - answer_tokens
    try:
        kept, dropped = fit_conversation(messages, lambda m: len(generator.chat_prompt_ids(m)) <= limit)
        ids = generator.chat_prompt_ids(kept)
    except InvalidArgumentError as exc:
        typer.echo(f"error: {exc}; the message was not sent", err=True)
        return messages[:-1], None
    if len(ids) > limit:  # the conversation stays as it was
        typer.echo(f"error: this message takes {len(ids)} prompt tokens, more than the {limit} the context leaves "
                   f"beside a {answer_tokens}-token answer; it was not sent (shorten it, or lower --max-new-tokens)",
                   err=True)
        return messages[:-1], None
    if dropped:
        typer.echo(f"[the conversation outgrew the context ({generator.max_positions} tokens with "
                   f"{answer_tokens} for the answer): dropped the {dropped} oldest message(s)]", err=True)
    return kept, ids


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
                                                     "transformers, llama.cpp (comma-separated; a peer that is not "
                                                     "installed is skipped with a note)."),
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
    with _user_errors():
        import os
        import platform

        import onnxruntime

        from specx.runtime import bench as b
        from specx.runtime.bundle import resolve_bundle_dir
        from specx.runtime.generator import Generator

        threads = _threads(threads)
        temps = _numbers(temperatures, "--temperatures")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise InvalidArgumentError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        generator = Generator.load(resolve_bundle_dir(model), provider=provider.value, threads=threads)
        chosen = b.check_modes(generator, modes.split(",")) if modes else b.supported_modes(generator)
        machine = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "provider": generator.provider,
                   "onnxruntime": onnxruntime.__version__}
        if tune:
            _tune(generator, b.load_prompts(prompts, b.TUNE_PROMPTS if limit is None else limit), chosen, temps,
                  b.TUNE_TOKENS if max_new_tokens is None else max_new_tokens, machine)
            return
        max_new_tokens = b.BENCH_TOKENS if max_new_tokens is None else max_new_tokens
        prompt_set = b.load_prompts(prompts, limit)
        typer.echo(f"specx bench: {len(prompt_set)} prompts x {len(temps)} temperatures, modes "
                   f"{', '.join(['autoregressive', *chosen])}, {max_new_tokens} tokens each", err=True)
        tree = {k: v for k, v in (("tree_budget", tree_budget), ("tree_depth", tree_depth),
                                  ("tree_threshold", tree_threshold), ("tree_floor", tree_floor)) if v is not None}
        peers = []
        if against:
            from specx.peers import load_peers

            peers = load_peers(against.split(","), generator.bundle.manifest, threads,
                               lambda note: typer.echo(note, err=True))
        rows = b.run_bench(generator, prompt_set, chosen, temps, max_new_tokens,
                           lambda r: typer.echo(f"  {r.mode} T={r.temperature:g} {r.prompt}: {r.speedup:.2f}x",
                                                err=True),
                           tree, peers)
        summary = b.summarise(rows)
        typer.echo(b.format_table(summary))
        if json_out:
            meta = {"bundle": str(generator.bundle.path), "provider": generator.provider, "threads": threads,
                    "machine": platform.machine(), "cores": os.cpu_count(),
                    "onnxruntime": onnxruntime.__version__, "max_new_tokens": max_new_tokens, "tree": tree}
            json_out.write_text(b.rows_to_json(rows, summary, meta))
        if plot:
            b.plot(rows, plot)


def _tune(generator, prompt_set, modes, temperatures, new_tokens, machine) -> None:
    import datetime

    from specx.runtime import bench as b

    record = {}
    for temperature in temperatures:
        key = "sampling" if temperature > 0 else "greedy"
        typer.echo(f"specx bench --tune ({key}): {len(b.candidates(modes, temperature > 0))} candidates x "
                   f"{len(prompt_set)} prompts, {new_tokens} tokens each", err=True)
        best, speedup, _ = b.tune(generator, prompt_set, modes, temperature, new_tokens,
                                  lambda c, s: typer.echo(f"  {c.mode}{_tree_text(asdict(c))}: {s:.2f}x", err=True))
        record[key] = {**b.tuning_record(best, speedup, len(prompt_set), new_tokens, machine),
                       "measured": datetime.date.today().isoformat(), "temperature": temperature}
        typer.echo(f"{key}: {best.mode}{_tree_text(asdict(best))}: {speedup:.2f}x plain decoding (median over prompts)")
    b.write_tuning(generator.bundle.path, record)
    typer.echo(f"written to {generator.bundle.path / 'manifest.json'}: run, Generator and bench use it by default")


def _tree_text(tree: dict) -> str:
    """' tree BxD threshold V[ floor F]' of a tuning candidate or record; '' for plain decoding."""
    if tree.get("mode") == "autoregressive":
        return ""
    floor = f" floor {tree['tree_floor']:g}" if tree.get("tree_floor") else ""
    threshold = tree.get("tree_threshold") or 0.0
    return f" tree {tree.get('tree_budget')}x{tree.get('tree_depth')} threshold {threshold:g}{floor}"


@app.command()
def info(bundle: Path = typer.Argument(..., help="Bundle directory."),
         verify: bool = typer.Option(False, "--verify", help="Also hash every file in full against the manifest's "
                                                             "records (sha256, ~0.4 s per 500 MB).")) -> None:
    """Summarise a bundle: models, architecture, dtype, parity, sizes. Fails as `specx run` would on a bad bundle."""
    with _user_errors():
        from specx.runtime.generator import Generator

        b = Generator.load(bundle).bundle  # every check run makes: files, graphs and their contracts, tables
        m = b.manifest
        typer.echo(f"bundle   {b.path}  (format {m.format_version}, specx {m.specx_version}, {m.created})")
        typer.echo(f"dtype    {m.dtype}")
        for entry in filter(None, (m.target, m.draft)):
            a = entry.architecture
            parity = entry.parity.get("max_abs_logit_diff", entry.parity.get("max_abs_diff"))
            parity_text = "n/a" if parity is None else f"{parity:.2e}"
            if "unquantized_max_abs_logit_diff" in entry.parity:  # quantization error, measured, not a defect
                parity_text += f" (before quantization {entry.parity['unquantized_max_abs_logit_diff']:.2e})"
            derived = f" (derived: {entry.derived_from})" if entry.derived_from else ""
            q = entry.quantization
            quant = (f"  quantized int{q['bits']} {q['method']} block {q['block_size']} accuracy_level "
                     f"{q['accuracy_level']}{', lm_head too' if q.get('lm_head') else ''}") if q else ""
            typer.echo(
                f"{entry.role:<8} {entry.source}{derived}  [{a.model_type}, {a.num_layers} layers, hidden "
                f"{a.hidden_size}, {a.num_heads} heads / {a.num_kv_heads} kv, vocab {a.vocab_size}, context "
                f"{a.max_positions}, {a.position_encoding} positions]  weights {entry.weight_bytes / 2**20:.1f} MiB"
                f"  max |logit diff| vs torch {parity_text}{quant}"
            )
        if m.draft is None:
            typer.echo("draft    none")
        elif m.draft.training:
            t = m.draft.training
            agree = ", ".join(f"{a:.0%}" for a in t.get("held_out_agreement", []))
            typer.echo(f"training feature draft ({t.get('draft_layers', 1)} layer(s) over target layers "
                       f"{t.get('feature_layers')}, vocabulary {t.get('draft_vocab')}): "
                       f"{t.get('train_tokens', 0):,} tokens, seed {t.get('seed')}, held-out agreement {agree}, "
                       f"tau {t.get('held_out_tau', 0):.2f}, {t.get('train_seconds', 0) / 60:.1f} min training")
        if m.ngram is None:
            typer.echo("ngram    none")
        else:
            info = m.ngram.info
            typer.echo(f"ngram    {m.ngram.file}  ({info.get('total_tokens', '?')} tokens: "
                       f"{info.get('sampled_tokens', 0)} sampled from {info.get('sampled_from', '?')}, "
                       f"{len(info.get('corpus_files', []))} corpus files)")
        for key, tuned in (m.tuning or {}).items():
            typer.echo(f"tuned    {key}: {tuned.get('mode')}{_tree_text(tuned)}: {tuned.get('speedup')}x plain "
                       f"decoding on {tuned.get('machine')} ({tuned.get('provider')}, {tuned.get('measured')})")
        t = m.tokenizer
        typer.echo(f"tokenizer {t.file}  vocab {t.vocab_size}, bos {t.bos_token_id}, eos {list(t.eos_token_ids)}")
        _info_files(b.path, m, verify)


def _info_files(path: Path, manifest, verify: bool) -> None:  # noqa: ANN001  (a Manifest: the runtime loads lazily)
    from specx.runtime.integrity import verify_files

    if manifest.files is None:
        typer.echo("files    not recorded (exported before specx recorded them; re-export to record them)")
    else:
        size = sum(r.size for r in manifest.files.values())
        typer.echo(f"files    {len(manifest.files)} recorded, {size / 2**20:.1f} MiB: sizes and spot digests checked "
                   f"at every load{'' if verify else '; --verify hashes them in full'}")
    if verify:
        done = verify_files(path, manifest)
        typer.echo(f"verified {done.files} files, {done.bytes / 2**20:.1f} MiB: sha256 as exported "
                   f"({done.seconds:.2f} s)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
