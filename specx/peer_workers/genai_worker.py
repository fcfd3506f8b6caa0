"""onnxruntime-genai's own decoding loop behind a JSON-lines pipe, for ``specx bench --against onnxruntime-genai``.

Run by the peer venv's python, by path (it imports nothing from specx):

    python -I genai_worker.py MODEL_DIR --threads 2

Startup: one line ``{"ready": true, "version": "0.18.0"}``, or ``{"error": "..."}`` and exit status 1.
Then, per request line ``{"ids": [...], "new_tokens": N, "temperature": T, "seed": S}``, one reply line
``{"tokens": [...], "seconds": X}`` or ``{"error": "..."}``. ``seconds`` is measured here, around the generation
(generator creation, prefill and every new token), so the pipe and JSON are not timed. Exactly N tokens are
generated (min_length = max_length masks EOS). T = 0 is greedy; T > 0 samples the full distribution (top_k 0 and
top_p 1 select genai's plain softmax sampling) with random_seed S. End of input ends the worker.

Replies go to a private copy of stdout; file descriptor 1 is pointed at stderr so that anything the native libraries
print cannot corrupt the protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REQUEST_KEYS = ("ids", "new_tokens", "temperature", "seed")


class RequestError(ValueError):
    """A request line this worker cannot serve."""


def parse_request(line: str) -> tuple[list[int], int, float, int]:
    try:
        request = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RequestError(f"not JSON: {exc}") from exc
    if not isinstance(request, dict) or any(k not in request for k in REQUEST_KEYS):
        raise RequestError(f"a request needs the keys {', '.join(REQUEST_KEYS)}")
    ids, new_tokens = request["ids"], request["new_tokens"]
    temperature, seed = request["temperature"], request["seed"]
    if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise RequestError("ids must be a non-empty list of token ids")
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise RequestError("new_tokens must be an integer >= 1")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise RequestError("temperature must be a number >= 0")
    if not isinstance(seed, int) or seed < 0:
        raise RequestError("seed must be an integer >= 0")
    return ids, new_tokens, float(temperature), seed


def search_options(prompt_tokens: int, new_tokens: int, temperature: float, seed: int) -> dict:
    """genai's search options for exactly ``new_tokens`` tokens, greedy (T = 0) or sampled from the full softmax."""
    total = prompt_tokens + new_tokens
    options = {"max_length": total, "min_length": total}
    if temperature > 0:
        # top_k 0 and top_p 1: genai's SampleTopP(1.0, T), i.e. no truncation (its default top_k is 50).
        return {**options, "do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0,
                "random_seed": seed}
    return {**options, "do_sample": False}


def thread_overlay(threads: int) -> str:
    """The builder's genai_config.json sets no thread count (ONNX Runtime then ran one busy thread here)."""
    return json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}})


def load_model(og, model_dir: str, threads: int):  # noqa: ANN001, ANN201  (og: the onnxruntime_genai module)
    config = og.Config(model_dir)
    config.overlay(thread_overlay(threads))
    return og.Model(config)


def generate(og, model, ids: list[int], new_tokens: int, temperature: float,  # noqa: ANN001
             seed: int) -> dict:
    params = og.GeneratorParams(model)
    params.set_search_options(**search_options(len(ids), new_tokens, temperature, seed))
    start = time.perf_counter()
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    seconds = time.perf_counter() - start
    sequence = generator.get_sequence(0)
    return {"tokens": [int(t) for t in sequence[len(ids):]], "seconds": seconds}


def serve(og, model, lines, reply) -> None:  # noqa: ANN001
    """One reply per request line until the input ends."""
    for line in lines:
        if not line.strip():
            continue
        try:
            reply(generate(og, model, *parse_request(line)))
        except RequestError as exc:
            reply({"error": f"bad request: {exc}"})
        except RuntimeError as exc:  # onnxruntime-genai raises RuntimeError (OrtException) for generation failures
            reply({"error": f"{type(exc).__name__}: {exc}"})


def protocol_stream():  # noqa: ANN201
    """A private copy of stdout for replies; fd 1 then goes to stderr."""
    stream = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return stream


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="onnxruntime-genai model folder (genai_config.json)")
    parser.add_argument("--threads", type=int, required=True, help="intra_op_num_threads of the decoder session")
    args = parser.parse_args(argv)
    out = protocol_stream()

    def reply(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    try:
        import onnxruntime_genai as og

        model = load_model(og, args.model, args.threads)
    except (ImportError, RuntimeError, OSError) as exc:
        reply({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    reply({"ready": True, "version": og.__version__})
    serve(og, model, sys.stdin, reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
