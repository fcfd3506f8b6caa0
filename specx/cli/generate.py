"""Commands that generate: `specx run` (one prompt) and `specx chat` (a conversation). Each builds one
GenerationConfig from its flags, validated before the bundle loads."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from specx.cli.common import DraftChoice, Mode, Provider, app, capped_threads, user_errors
from specx.errors import InvalidArgumentError, SpecxError

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
    with user_errors():
        from specx.runtime.bundle import resolve_bundle_dir
        from specx.runtime.config import GenerationConfig, TreeConfig
        from specx.runtime.generator import Generator

        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  seed=seed, ignore_eos=ignore_eos, mode=mode.value,
                                  tree=TreeConfig(budget=tree_budget, depth=tree_depth, threshold=tree_threshold,
                                                  floor=tree_floor, draft_choice=draft_choice.value))
        generator = Generator.load(resolve_bundle_dir(model), provider=provider.value, max_context=max_context,
                                   threads=capped_threads(threads))
        stream = generator.stream(prompt, config, chat=chat)
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
            plain = generator.generate(prompt, config, mode="autoregressive", chat=chat)
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
    with user_errors():
        from specx.runtime.bundle import resolve_bundle_dir
        from specx.runtime.config import GenerationConfig
        from specx.runtime.generator import Generator

        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, mode=mode.value)
        generator = Generator.load(resolve_bundle_dir(model), provider=provider.value)
        messages = [{"role": "system", "content": system}] if system else []
        generator.stream(messages + [{"role": "user", "content": "?"}], config)  # checks all, runs nothing
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
            stream = generator.stream(prompt, config, reuse_cache=True)
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
