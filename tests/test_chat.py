"""Chat prompts: the bundle's template renders and tokenizes exactly as transformers' apply_chat_template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from specx.errors import InvalidArgumentError
from specx.exporter.pipeline import ExportRequest, export_bundle
from specx.runtime import Generator
from tests import tiny_models
from specx.cli import app
from tests.test_cli import _ok, runner

# A ChatML template with a default system turn, loop variables, a filter and an error path: the constructs that
# real instruct templates (SmolLM2's among them) use.
TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<s>system\nYou are a helpful assistant.</s>\n' }}{% endif %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "{{ '<s>' + message['role'] + '\n' + message['content'] | trim + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "one two three"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "def f1(x):  "}],
    [{"role": "user", "content": "the quick"}, {"role": "assistant", "content": "brown fox"},
     {"role": "user", "content": "jumps over"}],
]


@pytest.fixture(scope="module")
def chat_model(models_dir: Path) -> Path:
    path = tiny_models.save_llama(models_dir / "tiny-llama-chat", layers=1, seed=6)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_bundle(tmp_path_factory, chat_model) -> Path:
    return export_bundle(ExportRequest(str(chat_model), draft="none", output=tmp_path_factory.mktemp("b") / "chat",
                                       dtype="fp32", ngram_tokens=0))


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_prompt_equals_transformers(chat_model, chat_bundle, conversation):
    expected = AutoTokenizer.from_pretrained(chat_model).apply_chat_template(conversation, add_generation_prompt=True,
                                                                             tokenize=True, return_dict=False)
    gen = Generator.load(chat_bundle, provider="cpu")
    assert gen.chat_prompt_ids(conversation) == list(expected)


def test_chat_flag_wraps_a_string_as_a_user_message(chat_bundle):
    gen = Generator.load(chat_bundle, provider="cpu")
    as_flag = gen.generate("one two three", chat=True, max_new_tokens=5, ignore_eos=True)
    as_messages = gen.generate(CONVERSATIONS[0], max_new_tokens=5, ignore_eos=True)
    plain = gen.generate("one two three", max_new_tokens=5, ignore_eos=True)
    assert as_flag.tokens == as_messages.tokens
    assert as_flag.stats.prompt_tokens > plain.stats.prompt_tokens


def test_chat_without_a_template_is_an_error(llama_bundle):
    gen = Generator.load(llama_bundle, provider="cpu")
    with pytest.raises(InvalidArgumentError, match="no chat template"):
        gen.generate("one", chat=True, max_new_tokens=2)


def test_bad_messages_are_errors(chat_bundle):
    gen = Generator.load(chat_bundle, provider="cpu")
    with pytest.raises(InvalidArgumentError, match="role"):
        gen.generate([{"role": "robot", "content": "hi"}], max_new_tokens=2)
    with pytest.raises(InvalidArgumentError, match="'role' and 'content'"):
        gen.generate([{"content": "hi"}], max_new_tokens=2)


def test_cli_chat(chat_bundle):
    out = json.loads(_ok(["run", "--model", str(chat_bundle), "--prompt", "one two", "--chat", "--max-new-tokens",
                          "3", "--json"]).stdout)
    assert out["stats"]["new_tokens"] >= 1 and out["stats"]["prompt_tokens"] > 10


@pytest.mark.parametrize("name,mode", [("llama_bundle", "autoregressive"), ("gpt2_bundle", "speculative"),
                                       ("gpt2_bundle", "staged"), ("int4_bundle", "autoregressive"),
                                       ("int4_bundle", "ngram")])  # int4: padded passes (contract min_rows 2)
def test_reused_cache_gives_the_fresh_result(request, name, mode):
    gen = Generator.load(request.getfixturevalue(name), provider="cpu")
    prompt = gen.bundle.tokenizer.encode("one two three four").ids
    first = gen.generate(prompt, max_new_tokens=10, ignore_eos=True, mode=mode, reuse_cache=True)
    follow = prompt + first.tokens + gen.bundle.tokenizer.encode(" five six").ids
    second = gen.generate(follow, max_new_tokens=12, ignore_eos=True, mode=mode, reuse_cache=True)
    fresh = gen.generate(follow, max_new_tokens=12, ignore_eos=True, mode=mode)
    assert second.tokens == fresh.tokens
    assert second.stats.reused_prompt_tokens >= len(prompt) + 9 and fresh.stats.reused_prompt_tokens == 0
    again = gen.generate(follow, max_new_tokens=12, ignore_eos=True, mode=mode, reuse_cache=True)
    assert again.tokens == fresh.tokens and again.stats.reused_prompt_tokens == len(follow) - 1


def test_cli_chat_session(chat_bundle):
    turns = "one two\nthree\nfour five\nsix\n/exit\n"
    result = runner.invoke(app, ["chat", str(chat_bundle), "--max-new-tokens", "4"], input=turns)
    assert result.exit_code == 0, result.output
    assert result.output.count("prompt tokens reused") == 4
    reused = [int(line.split(" of ")[0].rsplit(" ", 1)[1]) for line in result.output.splitlines()
              if "prompt tokens reused" in line]
    # every later turn reuses the earlier turns' cached rows (the cache is reserved once for the conversation)
    assert reused[0] == 0 and all(r > 40 for r in reused[1:]), reused


def test_cli_chat_without_a_template(llama_bundle):
    result = runner.invoke(app, ["chat", str(llama_bundle)], input="hi\n")
    assert result.exit_code == 1 and "no chat template" in result.output


def test_cli_chat_drops_the_oldest_turns_when_the_context_is_full(chat_bundle):
    """The session goes on past the context (it used to end with an error): the oldest turns go, said on stderr, and
    a message too long to fit even alone is refused without ending the session."""
    long_turn = "one two three four five six seven eight nine ten " * 2
    turns = [long_turn] * 6 + ["the quick " * 200, "one two", "/exit"]
    result = runner.invoke(app, ["chat", str(chat_bundle), "--system", "Answer briefly.", "--max-new-tokens", "24"],
                           input="\n".join(turns) + "\n")
    assert result.exit_code == 0, result.output
    assert "dropped the" in result.output and "oldest message(s)" in result.output
    assert "it was not sent" in result.output
    assert result.output.count("prompt tokens reused") == 7  # every turn but the refused one was answered


def test_fit_conversation_keeps_the_system_message_and_whole_turns():
    from specx.runtime.chat import fit_conversation

    chat = [{"role": "system", "content": "s"}]
    for k in range(3):
        chat += [{"role": "user", "content": f"u{k}"}, {"role": "assistant", "content": f"a{k}"}]
    chat.append({"role": "user", "content": "last"})
    kept, dropped = fit_conversation(chat, lambda m: len(m) <= 4)
    assert dropped == 4 and [m["content"] for m in kept] == ["s", "u2", "a2", "last"]
    kept, dropped = fit_conversation(chat, lambda m: False)  # nothing fits: the system message and the last stay
    assert [m["content"] for m in kept] == ["s", "last"] and dropped == 6
