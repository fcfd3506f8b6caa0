"""Greedy fixed-length decoding with onnxruntime-genai, as a peer for specx's benchmarks.

Run with the peers venv's python (benchmarks/peers/setup-genai.sh makes it), never specx's:

    $SPECX_PEERS/genai-venv/bin/python benchmarks/peers/genai_decode.py --model $SPECX_PEERS/genai-int4 \
        --prompts specx/data/prompts.jsonl --new-tokens 96 --threads 2 --repeats 3 --json out.json

Prompts are encoded with the tokenizer.json that specx uses (the `tokenizers` package, as specx does), so token ids
match across runners. Each prompt decodes exactly --new-tokens tokens (min_length masks EOS). Per prompt, the
median over repeats of end-to-end time (prefill + decode) and decode-only time (after the first generated token).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="onnxruntime-genai model dir (genai_config.json)")
    p.add_argument("--prompts", required=True, type=Path, help="JSONL with objects {id, kind, prompt}")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=2, help="intra_op_num_threads for the decoder session")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.json to encode prompts (default: MODEL/tokenizer.json, the builder's copy of the "
                        "HF dir's)")
    p.add_argument("--json", type=Path, default=None, help="write results here")
    return p.parse_args(argv)


def load_prompts(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def load_model(og, model_dir: Path, threads: int):
    config = og.Config(str(model_dir))
    # The builder's genai_config.json sets no thread count; ORT then runs one busy thread here.
    overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
    config.overlay(json.dumps(overlay))
    return og.Model(config)


def generate(og, model, ids: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """Greedy-decode exactly new_tokens tokens; return (tokens, end-to-end seconds, decode-only seconds)."""
    params = og.GeneratorParams(model)
    total = len(ids) + new_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    t0 = time.perf_counter()
    gen = og.Generator(model, params)
    gen.append_tokens(ids)  # prefill
    gen.generate_next_token()  # first token
    t1 = time.perf_counter()
    while not gen.is_done():
        gen.generate_next_token()
    t2 = time.perf_counter()
    seq = list(gen.get_sequence(0))
    del gen
    return [int(t) for t in seq[len(ids):]], t2 - t0, t2 - t1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import onnxruntime_genai as og
    from tokenizers import Tokenizer

    tok_path = args.tokenizer or args.model / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tok_path))
    prompts = load_prompts(args.prompts, args.limit)
    model = load_model(og, args.model, args.threads)

    encoded = [tokenizer.encode(p["prompt"]).ids for p in prompts]
    generate(og, model, encoded[0], args.new_tokens)  # warm-up

    results = []
    for prompt, ids in zip(prompts, encoded):
        runs = [generate(og, model, ids, args.new_tokens) for _ in range(args.repeats)]
        tokens = runs[0][0]
        if len(tokens) != args.new_tokens:
            raise SystemExit(f"{prompt['id']}: got {len(tokens)} new tokens, wanted {args.new_tokens}")
        seconds = statistics.median(r[1] for r in runs)
        decode_seconds = statistics.median(r[2] for r in runs)
        results.append({
            "id": prompt["id"],
            "kind": prompt.get("kind"),
            "prompt_tokens": len(ids),
            "new_tokens": len(tokens),
            "seconds": seconds,
            "decode_seconds": decode_seconds,
            "tokens_per_second": len(tokens) / seconds,
            # decode-only: the tokens after the first one, over the time after the first one
            "decode_tokens_per_second": (len(tokens) - 1) / decode_seconds if decode_seconds > 0 else float("nan"),
            "repeats_agree": all(r[0] == tokens for r in runs),
            "tokens": tokens,
        })

    tps = statistics.median(r["tokens_per_second"] for r in results)
    dtps = statistics.median(r["decode_tokens_per_second"] for r in results)
    report = {
        "peer": "onnxruntime-genai",
        "version": og.__version__,
        "model": str(args.model.resolve()),
        "threads": args.threads,
        "provider": "cpu",
        "cores": os.cpu_count(),
        "tokenizer": str(tok_path),
        "tokenizer_sha256": hashlib.sha256(Path(tok_path).read_bytes()).hexdigest(),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "median_tokens_per_second": tps,
        "median_decode_tokens_per_second": dtps,
        "prompts": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"onnxruntime-genai {og.__version__} {args.model.name}: {len(results)} prompts x {args.new_tokens} tokens, "
          f"{args.threads} threads, median {tps:.1f} tok/s end-to-end, {dtps:.1f} tok/s decode-only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
