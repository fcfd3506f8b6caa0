"""Tiny random Hugging Face checkpoints built from configs, each with a byte-level BPE tokenizer trained on the spot.

Nothing is downloaded: the tests run offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 384
CONTEXT = 160
# A wide init makes random models decisive and varied (the default 0.02 repeats one token forever).
INIT_RANGE = 0.3

WORDS = ("the quick brown fox jumps over a lazy dog while def return class import for in range print list dict "
         "value key error log info warning data model token tree draft target speed cache layer attention "
         "one two three four five six seven eight nine ten and or not if else elif while with as from yield")


def corpus() -> list[str]:
    words = WORDS.split()
    lines = []
    for i in range(400):
        lines.append(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)))
        lines.append(f"def f{i}(x):\n    return x * {i} + {i % 7}\n")
    return lines


def train_tokenizer(special: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return tok


def save_gpt2(path: Path, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, seed: int = 0,
              init_range: float = INIT_RANGE) -> Path:
    tok = train_tokenizer(["<|endoftext|>"])
    eos = tok.token_to_id("<|endoftext|>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    config = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        bos_token_id=eos, eos_token_id=eos, initializer_range=init_range)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def save_llama(path: Path, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               tied: bool = False, seed: int = 1) -> Path:
    tok = train_tokenizer(["<s>", "</s>"])
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=CONTEXT,
                         tie_word_embeddings=tied, bos_token_id=bos, eos_token_id=eos, initializer_range=INIT_RANGE)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path



def save_trained_llama(path: Path, steps: int = 150, seed: int = 3) -> Path:
    """A tiny llama trained briefly on the tiny corpus: predictable text, so that a draft has something to learn
    (a random model's next token is close to a hash of its context)."""
    save_llama(path, layers=2, hidden=64, heads=4, kv_heads=2, tied=True, seed=seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path)
    ids = tokenizer("\n".join(corpus()), return_tensors="pt")["input_ids"][0]
    window, batch = 64, 16
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - window - 1, (batch,), generator=generator)
        x = torch.stack([ids[s:s + window] for s in starts])
        loss = model(x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(path)
    return path


VOCAB_PADDING = 16  # embedding rows beyond the tokenizer, as real checkpoints pad (room for tokens a family's
                   # tokenizer class adds, e.g. qwen2's <|endoftext|>)
WINDOW = 6  # sliding windows much shorter than the tests' contexts (export validation alone spans 16 positions)

# Tiny configs of every family specx exports, with the variants that change the graph. Shared by all: 2 layers,
# hidden 64, 4 heads over 2 KV heads, the tiny vocabulary and context.
FAMILIES: dict[str, tuple[str, dict]] = {
    "qwen2": ("qwen2", {}),  # q/k/v biases
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                   tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=32, tie_word_embeddings=True)),  # q/k norms, head_dim apart from hidden/heads
    "mistral": ("mistral", dict(sliding_window=WINDOW)),
    "phi3": ("phi3", dict(partial_rotary_factor=0.5, sliding_window=48, original_max_position_embeddings=32,
                          rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
                                        "long_factor": [2.0, 4.0, 8.0, 16.0]})),
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                              attn_logit_softcapping=4.0, final_logit_softcapping=8.0,
                              hidden_activation="gelu_pytorch_tanh")),
    "gemma3_text": ("gemma3_text", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                                        layer_types=["sliding_attention", "full_attention"],
                                        rope_local_base_freq=100.0, hidden_activation="gelu_pytorch_tanh")),
    "smollm3": ("smollm3", dict(no_rope_layer_interval=2)),  # layer 1 without rotary positions
    "llama-hd12": ("llama", dict(hidden_size=48, head_dim=12)),  # a head size GroupQueryAttention refuses
}


def save_family(path: Path, variant: str, seed: int = 7, **sizes: int) -> Path:
    """A tiny random checkpoint of ``FAMILIES[variant]`` with a tokenizer, saved to ``path``; ``sizes`` override
    the shared config (benchmarks/families.py builds larger ones)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides = FAMILIES[variant]
    tok = train_tokenizer(["<s>", "</s>"])
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    hidden = overrides.get("hidden_size", 64)
    settings = dict(vocab_size=VOCAB + VOCAB_PADDING, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                    tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
                    initializer_range=INIT_RANGE)
    settings.update(overrides)
    settings.update(sizes)
    if "layer_types" in settings:  # the variant's pattern, repeated over the layers asked for
        pattern, layers = settings["layer_types"], settings["num_hidden_layers"]
        settings["layer_types"] = [pattern[i % len(pattern)] for i in range(layers)]
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if model_type.startswith("gemma"):  # gemma's norms start at 0 (scale 1): vary them, or (1 + w) goes untested
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.normal_(0.0, INIT_RANGE)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path
