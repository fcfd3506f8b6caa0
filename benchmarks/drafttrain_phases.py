"""train-draft's phases, measured per process on this CPU for a bundle's target, and projected to the default draft
of a 1B and a 3B target on one GPU and on eight.

    python benchmarks/drafttrain_phases.py --bundle DIR [--tokens 2048] [--epochs 1] [--threads T]
                                           [--precision auto|fp32|bf16] [--utilisation 0.35]
                                           [--generation-utilisation 0.10] [--json out.json]

Measured, in this one process (a process of a torchrun job does the same work on its shards): text tokens/s of the
target writing its text (prompts included), of the teacher-forced labelling pass, and of training the draft (rows
in the loss per second). Each becomes an effective FLOP/s through its FLOPs per token:

    texts, labels   2 x target parameters                      (a forward pass; attention left out)
    training        6 x draft parameters x unroll (3)          (forward and backward of each unrolled step)

Projected (train-draft's defaults: 700,000 tokens, 8 epochs, one draft layer, a vocabulary of 8,192, EAGLE-3's
three feature layers) for Llama-3.2-1B and -3B (published configs):

    this CPU        the FLOPs at the effective FLOP/s measured here, one process (as if FLOP/s did not change with
                    the model's size)
    a GPU           the FLOPs at the GPU's published dense bf16 peak (A100 80GB: 312 TFLOPS, H100 SXM: 989 TFLOPS)
                    times a utilisation: --utilisation for labelling and training (batched passes), lower
                    --generation-utilisation for writing the text (token by token: bound by reading the weights)
    8 GPUs          a GPU's time / 8: the phases' shards and the global batch shared evenly (raise --batch with the
                    GPUs, or each gets one text a step), the all-reduce and the main process's graph export and tau
                    measurement (minutes, not projected) left out

The measurement is a small budget (seconds on a small model); give a budget of several shards for figures to plan
with.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine  # noqa: E402
from specx.drafttrain.data import (distill, draft_vocabulary, next_round, text_length, text_shares,  # noqa: E402
                                   write_text_shard)
from specx.drafttrain.pipeline import DEFAULT_DRAFT_VOCAB, DEFAULT_TOKENS  # noqa: E402
from specx.drafttrain.precision import fast_dtype, in_precision  # noqa: E402
from specx.drafttrain.train import TrainConfig, default_feature_layers, new_draft, train  # noqa: E402
from specx.exporter.adapters import adapter_for  # noqa: E402
from specx.exporter.sources import load_source  # noqa: E402
from specx.runtime.bundle import Bundle  # noqa: E402

GPUS = {"A100 80GB": 312e12, "H100 SXM": 989e12}  # dense bf16 tensor-core peak FLOP/s, as published
GPU_COUNTS = (1, 8)
FEATURE_LAYERS = 3  # EAGLE-3's low / middle / high


@dataclass(frozen=True)
class Target:
    name: str
    params: float
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int


TARGETS = (  # the published Llama-3.2 configs
    Target("Llama-3.2-1B", 1.236e9, 2048, 32, 8, 64, 8192),
    Target("Llama-3.2-3B", 3.213e9, 3072, 24, 8, 128, 8192),
)


def draft_params(hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int, vocab: int = DEFAULT_DRAFT_VOCAB,
                 layers: int = 1) -> int:
    """The feature draft's trained weights (model.py): fuse, fc, its decoder layers, the head (norms left out)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * ffn
    return FEATURE_LAYERS * hidden * hidden + 2 * hidden * hidden + layers * per_layer + vocab * hidden


def flops_per_token(target_params: float, draft: float, epochs: float, unroll: int) -> dict[str, float]:
    """FLOPs per training token of each phase (training: all epochs)."""
    return {"texts": 2 * target_params, "labels": 2 * target_params, "training": 6 * draft * unroll * epochs}


def measure(bundle: Path, tokens: int, epochs: float, precision: str) -> dict:
    """Tokens/s of each phase in this process, with the FLOPs per token that make them FLOP/s."""
    loaded = load_source(Bundle.load(bundle).manifest.target.source, "fp32")
    adapter = adapter_for(loaded.model.config)
    layers = default_feature_layers(adapter.spec.num_layers)
    dtype = fast_dtype("cpu") if precision == "auto" else {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    model = in_precision(loaded.model, dtype)
    start = time.perf_counter()
    plan = next_round(tokens, text_shares(loaded.tokenizer), [], text_length(model))
    texts = [text for shard in plan for text in write_text_shard(model, loaded.tokenizer, shard, seed=0)]
    texts_seconds = time.perf_counter() - start
    start = time.perf_counter()
    data = distill(model, texts, layers)
    labels_seconds = time.perf_counter() - start
    vocab_map = draft_vocabulary(data, DEFAULT_DRAFT_VOCAB, adapter.spec.vocab_size)
    draft = new_draft(loaded.model, adapter, layers, vocab_map, seed=0)
    config = TrainConfig(epochs=epochs, mixed_precision=dtype == torch.bfloat16, compile=False)
    log = train(draft, data, vocab_map, adapter.spec.vocab_size, config)
    params = sum(p.numel() for p in loaded.model.parameters())
    per_token = flops_per_token(params, sum(p.numel() for p in draft.parameters() if p.requires_grad), 1.0,
                                config.unroll)
    rates = {"texts": data.num_tokens / texts_seconds, "labels": data.num_tokens / labels_seconds,
             "training": log.tokens_seen / log.seconds}
    return {"bundle": str(bundle), "target_params": params, "precision": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "text_tokens": data.num_tokens, "train_steps": log.steps,
            "tokens_per_second": rates, "flops_per_token": per_token,
            "flops_per_second": {phase: rates[phase] * per_token[phase] for phase in rates}}


def projection(measured: dict, utilisation: float, generation_utilisation: float,
               epochs: float = TrainConfig.epochs, tokens: int = DEFAULT_TOKENS) -> list[dict]:
    """Minutes of each phase for the default draft of each target: this CPU (one process), each GPU x 1 and 8."""
    rows = []
    for target in TARGETS:
        draft = draft_params(target.hidden, target.heads, target.kv_heads, target.head_dim, target.ffn)
        needed = {phase: f * tokens for phase, f in
                  flops_per_token(target.params, draft, epochs, TrainConfig.unroll).items()}
        rows.append(_row(target.name, "this CPU, 1 process (measured rate)", needed, measured["flops_per_second"]))
        for gpu, peak in GPUS.items():
            rates = {"texts": peak * generation_utilisation, "labels": peak * utilisation,
                     "training": peak * utilisation}
            for count in GPU_COUNTS:
                rows.append(_row(target.name, f"{count} x {gpu}", needed, {p: r * count for p, r in rates.items()}))
    return rows


def _row(target: str, hardware: str, needed: dict[str, float], rates: dict[str, float]) -> dict:
    minutes = {phase: needed[phase] / rates[phase] / 60 for phase in needed}
    return {"target": target, "hardware": hardware, "minutes": minutes, "total_minutes": sum(minutes.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle whose target is measured")
    parser.add_argument("--tokens", type=int, default=2048, help="text the target writes and labels here")
    parser.add_argument("--epochs", type=float, default=1.0, help="training passes measured here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of this process")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--utilisation", type=float, default=0.35, help="of a GPU's peak: labelling and training")
    parser.add_argument("--generation-utilisation", type=float, default=0.10, help="of a GPU's peak: writing text")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    measured = measure(args.bundle, args.tokens, args.epochs, args.precision)
    print(f"{measured['bundle']}: {measured['target_params'] / 1e6:.1f}M parameters, {measured['precision']}, "
          f"{measured['threads']} threads, {measured['text_tokens']:,} tokens, {measured['train_steps']} steps")
    print(f"{'phase':<10} {'tokens/s':>10} {'GFLOP/token':>12} {'GFLOP/s':>9}")
    for phase, rate in measured["tokens_per_second"].items():
        print(f"{phase:<10} {rate:>10,.0f} {measured['flops_per_token'][phase] / 1e9:>12.3f} "
              f"{measured['flops_per_second'][phase] / 1e9:>9.1f}")
    rows = projection(measured, args.utilisation, args.generation_utilisation)
    print(f"\nthe default draft ({DEFAULT_TOKENS:,} tokens, {TrainConfig.epochs:g} epochs): minutes per phase "
          f"(GPU utilisation {args.utilisation:.0%}, writing text {args.generation_utilisation:.0%})")
    print(f"{'target':<13} {'hardware':<36} {'texts':>10} {'labels':>10} {'training':>10} {'total':>10}")
    for row in rows:
        minutes = row["minutes"]
        print(f"{row['target']:<13} {row['hardware']:<36} {minutes['texts']:>10,.1f} {minutes['labels']:>10,.1f} "
              f"{minutes['training']:>10,.1f} {row['total_minutes']:>10,.1f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "measured": measured, "projection": rows,
                                         "assumptions": {"utilisation": args.utilisation,
                                                         "generation_utilisation": args.generation_utilisation,
                                                         "gpus": GPUS}}, indent=2))


if __name__ == "__main__":
    main()
