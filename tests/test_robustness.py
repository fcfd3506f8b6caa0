"""Inputs and uses that used to break the runtime: shared Generators, trees at the end of the context, templates and
arguments that never end or crash, and CLI values that were silently misread."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from specx.cli import app
from specx.errors import CapacityError, InvalidArgumentError, StreamInterruptedError
from specx.runtime import Generator
from specx.runtime.chat import render_chat
from specx.runtime.sandbox import TEMPLATE_SECONDS
from tests.test_cli import _user_error, runner

TREES = [(8, 4), (12, 3), (30, 2)]  # wider than a chain: more nodes than the last steps have positions for


@pytest.fixture(scope="module")
def self_gen(llama_self_bundle) -> Generator:
    return Generator.load(llama_self_bundle, provider="cpu")


def _to_the_end(gen: Generator, prompt: str = "one two three") -> tuple[list[int], int, list[int]]:
    """Prompt ids, the new tokens that fill the context, and plain decoding's tokens for them."""
    ids = gen.bundle.tokenizer.encode(prompt).ids
    new = gen.max_positions - len(ids)
    plain = gen.generate(ids, max_new_tokens=new, ignore_eos=True, mode="autoregressive").tokens
    assert len(plain) == new
    return ids, new, plain


# -- trees at the end of the context -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["speculative", "staged", "ngram"])
@pytest.mark.parametrize("budget,depth", TREES)
def test_a_wide_tree_reaches_the_end_of_the_context(self_gen, mode, budget, depth):
    """Near the end the tree shrinks to the positions left (it crashed in GroupQueryAttention: cos_cache dimension 0
    shall not be less than total_sequence_length)."""
    ids, new, plain = _to_the_end(self_gen)
    out = self_gen.generate(ids, max_new_tokens=new, ignore_eos=True, mode=mode, tree_budget=budget, tree_depth=depth)
    assert out.tokens == plain


@pytest.mark.parametrize("kwargs", [{"temperature": 1.0, "seed": 3}, {"temperature": 1.0, "seed": 3,
                                                                         "draft_choice": "top"}, {"tree_floor": 0.05}])
def test_drawn_and_floored_trees_reach_the_end_of_the_context(self_gen, kwargs):
    ids, new, plain = _to_the_end(self_gen)
    out = self_gen.generate(ids, max_new_tokens=new, ignore_eos=True, mode="speculative", tree_budget=12,
                            tree_depth=3, **kwargs)
    assert len(out.tokens) == new
    if "temperature" not in kwargs:
        assert out.tokens == plain


def test_a_tuned_tree_reaches_the_end_of_the_context(self_gen, monkeypatch):
    ids, new, plain = _to_the_end(self_gen)
    monkeypatch.setattr(self_gen, "tuned", lambda sampling: {"mode": "staged", "tree_budget": 12, "tree_depth": 6,
                                                             "tree_threshold": 0.0})
    out = self_gen.generate(ids, max_new_tokens=new, ignore_eos=True)
    assert out.tokens == plain and out.stats.tree_budget == 12


def test_a_capped_context_bounds_trees_and_caches(llama_self_bundle):
    gen = Generator.load(llama_self_bundle, provider="cpu", max_context=40)
    ids, new, plain = _to_the_end(gen)
    out = gen.generate(ids, max_new_tokens=new, ignore_eos=True, mode="staged", tree_budget=30, tree_depth=3)
    assert out.tokens == plain
    assert gen.target.capacity <= 64 and gen.draft.capacity <= 64  # one cache block: the cap bounds memory


# -- one Generator, several users -----------------------------------------------------------------------------------
PROMPTS = ["one two three", "def f1(x):", "the quick brown fox", "data model token", "import print list",
           "four five six", "while with as", "key error log"]
THREADS = 8
ROUNDS = 3


@pytest.mark.parametrize("mode", ["autoregressive", "staged"])
def test_threads_sharing_a_generator_each_get_their_own_output(self_gen, mode):
    """Generations from 8 threads are serialised: each equals the single-threaded output (9 of 20 differed, or the
    staged mode raised cache errors)."""
    alone = {p: self_gen.generate(p, max_new_tokens=24, ignore_eos=True, mode=mode).tokens for p in PROMPTS}

    def work(k: int) -> list[tuple[str, list[int]]]:
        prompts = [PROMPTS[(k + r) % len(PROMPTS)] for r in range(ROUNDS)]
        return [(p, self_gen.generate(p, max_new_tokens=24, ignore_eos=True, mode=mode).tokens) for p in prompts]

    with ThreadPoolExecutor(THREADS) as pool:
        results = [pair for batch in pool.map(work, range(THREADS)) for pair in batch]
    assert len(results) == THREADS * ROUNDS
    assert all(tokens == alone[prompt] for prompt, tokens in results)


def test_a_second_stream_in_one_thread_interrupts_the_first(self_gen):
    alone = self_gen.generate(PROMPTS[1], max_new_tokens=16, ignore_eos=True).text
    first = self_gen.stream(PROMPTS[0], max_new_tokens=16, ignore_eos=True)
    pieces = iter(first)
    next(pieces)
    second = self_gen.stream(PROMPTS[1], max_new_tokens=16, ignore_eos=True)
    assert "".join(second) == alone  # the second runs on caches of its own
    with pytest.raises(StreamInterruptedError, match="another generation started"):
        next(pieces)  # the first does not run on the second's caches
    assert self_gen.generate(PROMPTS[1], max_new_tokens=16, ignore_eos=True).text == alone


def test_another_thread_waits_for_an_open_stream(self_gen):
    alone = {p: self_gen.generate(p, max_new_tokens=16, ignore_eos=True).tokens for p in PROMPTS[:2]}
    with self_gen.stream(PROMPTS[0], max_new_tokens=16, ignore_eos=True) as stream:
        pieces = iter(stream)
        next(pieces)
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(self_gen.generate, PROMPTS[1], max_new_tokens=16, ignore_eos=True)
            time.sleep(0.3)
            assert not other.done()  # it waits for the stream, which keeps its caches
            rest = list(pieces)
            assert stream.result.tokens == alone[PROMPTS[0]] and rest
            assert other.result(timeout=60).tokens == alone[PROMPTS[1]]


# -- chat templates: bounded, and failures are one clear error -----------------------------------------------------
TEMPLATES = {
    "nested loops": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "loops over strings": "{% for a in 'x' * 100000 %}{% for b in 'x' * 100000 %}{% endfor %}{% endfor %}",
    "range too big": "{{ range(10 ** 9) | list }}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "huge integer": "{{ 7 ** 100000 }}",
    "squaring": "{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "huge string": "{{ 'x' * 10 ** 10 }}",
    "doubling string": "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                       "{% endfor %}",
    "wide field": "{{ '%999999999d' % 1 }}{{ '{:999999999}'.format(1) }}",
    "wide filter": "{{ 'x' | center(10 ** 9) }}",
    "huge output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "division by zero": "{{ 1 / 0 }}",
}


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_hostile_chat_template_fails_fast_with_a_clear_error(name):
    """Each ran for ever, took gigabytes, or raised a bare OverflowError / RecursionError / ValueError."""
    start = time.monotonic()
    with pytest.raises(InvalidArgumentError, match="chat template"):
        render_chat(TEMPLATES[name], [{"role": "user", "content": "hi"}], {})
    assert time.monotonic() - start < TEMPLATE_SECONDS + 1


def test_a_bounded_template_renders_as_jinja_does():
    template = ("{% for m in messages %}{{ loop.index }}:{{ m['role'] }}={{ m.content | trim }}{% if not loop.last %}"
                ",{% endif %}{% endfor %}{{ '%03d' % 7 }}{{ '{:>4}'.format('x') }}{{ (range(2) | list) * 2 }}")
    messages = [{"role": "user", "content": " a "}, {"role": "assistant", "content": "b"}]
    assert render_chat(template, messages, {}) == "1:user=a,2:assistant=b007   x[0, 1, 0, 1]"


# -- the Python API refuses what it would misread ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"prompt": b"one two"}, "bytes"),
    ({"prompt": [1.7, 2.2]}, "integers"),
    ({"prompt": [True, 2]}, "integers"),
    ({"prompt": None}, "the prompt must be"),
    ({"prompt": 5}, "the prompt must be"),
    ({"prompt": {"role": "user", "content": "hi"}}, "single mapping"),
    ({"prompt": "bad \udcff byte"}, "UTF-8"),
    ({"prompt": "one", "max_new_tokens": "5"}, "max_new_tokens must be an integer"),
    ({"prompt": "one", "temperature": "0.5"}, "temperature must be a number"),
    ({"prompt": "one", "seed": -1}, "seed"),
    ({"prompt": "one", "seed": 1.5}, "seed"),
    ({"prompt": "one", "top_k": 2.5}, "top_k"),
    ({"prompt": "one", "tree_budget": "8"}, "tree_budget"),
    ({"prompt": "one", "tree_threshold": float("nan")}, "tree_threshold"),
    ({"prompt": "one", "ignore_eos": "yes"}, "ignore_eos"),
    ({"prompt": "one", "mode": None}, "unknown mode"),
    ({"prompt": "one", "draft_choice": 3}, "unknown draft choice"),
])
def test_bad_api_arguments_are_specx_errors(self_gen, kwargs, match):
    calls = self_gen.target.calls
    with pytest.raises(InvalidArgumentError, match=match):
        self_gen.generate(max_new_tokens=kwargs.pop("max_new_tokens", 3), **kwargs)
    assert self_gen.target.calls == calls


def test_numpy_token_ids_are_token_ids(self_gen):
    ids = self_gen.bundle.tokenizer.encode("one two").ids
    assert self_gen.generate(np.asarray(ids), max_new_tokens=4).tokens == self_gen.generate(ids, max_new_tokens=4).tokens


def test_a_tree_larger_than_the_context_is_refused_before_allocating(self_gen):
    """A budget of 10^9 asked for 119 GiB of cache."""
    with pytest.raises(CapacityError, match="tree budget of 1000000000 cannot fit a context of 160"):
        self_gen.generate("one", max_new_tokens=3, mode="speculative", tree_budget=10 ** 9, tree_depth=4)
    with pytest.raises(CapacityError, match="tree depth"):
        self_gen.generate("one", max_new_tokens=3, mode="speculative", tree_depth=10 ** 6)


def test_threads_beyond_the_cores_are_lowered_with_a_warning(llama_bundle):
    with pytest.warns(RuntimeWarning, match="cores"):
        gen = Generator.load(llama_bundle, provider="cpu", threads=100_000)
    assert len(gen.generate("one", max_new_tokens=3, ignore_eos=True).tokens) == 3


# -- the CLI: one error line, nothing misread -------------------------------------------------------------------------
def test_cli_run_refuses_bad_values_in_one_line(llama_bundle):
    _user_error(["run", "--model", str(llama_bundle), "--prompt", "bad \udcff byte"], "UTF-8")
    _user_error(["run", "--model", str(llama_bundle), "--prompt", "one", "--seed", "-1"], "seed")
    _user_error(["run", "--model", str(llama_bundle), "--prompt", "one", "--tree-budget", str(10 ** 9)], "tree budget")


def test_cli_threads_are_capped_to_the_cores(llama_bundle):
    result = runner.invoke(app, ["run", "--model", str(llama_bundle), "--prompt", "one", "--max-new-tokens", "2",
                                 "--threads", "100000"])
    assert result.exit_code == 0, result.output
    assert f"warning: 100000 threads asked for, but this machine has {os.cpu_count()} cores" in result.output


@pytest.mark.parametrize("args,match", [
    (["--temperatures", "abc"], "--temperatures"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--limit", "-1"], "--limit must be >= 1"),
])
def test_cli_bench_refuses_values_it_used_to_misread(llama_bundle, args, match):
    """--max-new-tokens 0 ran 128 tokens, --limit 0 every prompt, --limit -1 all but one; abc was a traceback."""
    _user_error(["bench", str(llama_bundle), *args], match)


def test_bench_limits_the_prompts_to_exactly_the_limit():
    from specx.runtime.bench import load_prompts

    every = load_prompts()
    assert len(load_prompts(limit=1)) == 1 and load_prompts(limit=None) == every
