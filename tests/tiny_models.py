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
