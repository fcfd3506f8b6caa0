"""Post-export validation: the ONNX graph must give the PyTorch model's logits on a random token tree with a
non-empty past (real KV from a prefix pass, not noise)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from specx.errors import ExportError
from specx.exporter.adapters import ArchitectureAdapter
from specx.exporter.onnx_export import commit_path
from specx.exporter.wrapper import TreeDecoder
from specx.graphs.contract import GraphContract
from specx.graphs.precision import CUDA, PRECISIONS
from specx.runtime.decoding import feed
from specx.runtime.session import DecoderSession, open_session
from specx.runtime.tree import Tree, build_tree, chain

# |ORT - torch| must stay below TOLERANCE[dtype] * max(1, max |logit|).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "int8": 1e-4, "int4": 1e-4, "fp16-int8": 2e-2, "fp16-int4": 2e-2,
             "bf16": 8e-2}  # bfloat16 keeps 8 mantissa bits to float16's 11: 4x float16's bound
# quantized dtypes: measured, not enforced; their unquantized graph is held to its float dtype's tolerance
# A tree pass must give every node the logits one-token steps give it (what plain decoding computes), within this
# share of the largest logit, or speculation changes the output. fp32 differs by ~2e-5 of ~20 (summation order);
# MatMulNBits at accuracy_level 4 (int8 activations) by 0.4-2.4 on SmolLM2-135M: a one-row call (attention's M=1
# GEMM; MatMulNBits at blocks over 32) differs from a multi-row one by ~1e-7 and quantizing activations amplifies
# that. Padded passes (contract.padded_attention, min_rows / row_multiple) make chains bit-exact; trees stay inexact
# (a node's ancestors sit apart in the pass, so the softmax sums them in another order), and there any difference
# counts: a tiny model's trees measured 6e-6 apart and still changed a greedy output. accuracy_level 0: 6e-5.
ROW_CONSISTENCY = 1e-3
VALIDATION_PAST = 7
VALIDATION_TREE_NODES = 9


@dataclass(frozen=True)
class Parity:
    max_abs_logit_diff: float
    tolerance: float
    provider: str
    tree_vs_steps: float  # max |tree-pass logits - one-token-step logits| over the validation tree's nodes
    row_consistent: bool  # tree_vs_steps within ROW_CONSISTENCY (0 for padded graphs): trees keep plain decoding's
                          # output
    chain_vs_steps: float  # the same for a chain of the same tokens
    chains_exact: bool  # chain_vs_steps within the same bound: chains keep plain decoding's output

    def to_dict(self) -> dict[str, float | str | bool]:
        return {"max_abs_logit_diff": self.max_abs_logit_diff, "tolerance": self.tolerance, "provider": self.provider,
                "tree_vs_steps": self.tree_vs_steps, "row_consistent": self.row_consistent,
                "chain_vs_steps": self.chain_vs_steps, "chains_exact": self.chains_exact}


def random_tree(nodes: int, rng: np.random.Generator) -> Tree:
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, nodes)]
    return build_tree(parents)


def torch_tree_pass(wrapper: TreeDecoder, contract: GraphContract, prefix: np.ndarray, tree_tokens: np.ndarray,
                    tree: Tree) -> np.ndarray:
    """Prefix pass (chain) then one tree pass in PyTorch; returns the tree's logits."""
    empty = [torch.zeros(1, contract.num_kv_heads, 0, contract.head_dim, dtype=wrapper.model.dtype)
             for _ in contract.past_input_names]
    run = chain(prefix.size)
    with torch.no_grad():
        out = wrapper(torch.from_numpy(prefix[None]), torch.from_numpy(run.positions(0)),
                      torch.from_numpy(run.attention_mask(0)), *empty)
        past = list(out[1:])
        out = wrapper(torch.from_numpy(tree_tokens[None]), torch.from_numpy(tree.positions(prefix.size)),
                      torch.from_numpy(tree.attention_mask(prefix.size)), *past)
    return out[0].float().numpy()


def validate_decoder(adapter: ArchitectureAdapter, model: torch.nn.Module, contract: GraphContract, path: Path,
                     dtype: str, seed: int = 0, enforce: bool = True, past: int = VALIDATION_PAST,
                     nodes: int = VALIDATION_TREE_NODES) -> Parity:
    """Max |ORT - torch| logit difference on a random tree after a prefix, ORT run through the runtime's own static
    cache session; above tolerance is an ExportError when ``enforce`` (quantized graphs are measured, not held to
    the tolerance)."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, contract.vocab_size, past).astype(np.int64)
    tree = random_tree(nodes, rng)
    tokens = rng.integers(0, contract.vocab_size, tree.size).astype(np.int64)
    wrapper = TreeDecoder(model, adapter).eval()
    reference = torch_tree_pass(wrapper, contract, prefix, tokens, tree)

    provider = "cuda" if PRECISIONS[dtype].device == CUDA and _has_cuda() else "cpu"
    decoder, placement = open_session(path, provider)
    committer, _ = open_session(commit_path(path), placement.name)
    session = DecoderSession(decoder, committer, contract, placement)
    session.reserve(prefix.size + tree.size)
    run = chain(prefix.size)
    session.forward(prefix[None], run.positions(0), run.attention_mask(0))
    session.commit()
    logits = session.forward(tokens[None], tree.positions(prefix.size), tree.attention_mask(prefix.size))
    diff = float(np.max(np.abs(logits.astype(np.float64) - reference)))
    scale = max(1.0, float(np.max(np.abs(reference))))
    tolerance = TOLERANCE[dtype] * scale
    steps = tree_vs_steps(session, prefix.size, tokens, tree, logits[0])
    session.rewind(prefix.size)
    run = chain(tokens.size)
    chain_logits = session.forward(tokens[None], run.positions(prefix.size), run.attention_mask(prefix.size))
    chain_steps = tree_vs_steps(session, prefix.size, tokens, run, chain_logits[0])
    if enforce and not diff <= tolerance:  # also catches NaN
        raise ExportError(
            f"{path.name}: ONNX logits differ from PyTorch by {diff:.3g} (tolerance {tolerance:.3g}); "
            "the export is wrong for this model, please report it"
        )
    # int8-activation graphs (padded to two rows) amplify any difference: only bitwise equality is exact there
    consistency = 0.0 if contract.padded else ROW_CONSISTENCY * scale
    return Parity(diff, tolerance, placement.name, steps, bool(steps <= consistency), chain_steps,
                  bool(chain_steps <= consistency))


def tree_vs_steps(session: DecoderSession, past: int, tokens: np.ndarray, tree: Tree, tree_logits: np.ndarray) -> float:
    """Max |logit| difference between a tree pass's rows (n, vocab) and the same nodes decoded one token at a time
    after the committed ``past`` rows, as plain decoding runs them."""
    worst = 0.0
    for node in range(tree.size):
        session.rewind(past)
        for token in tokens[tree.path(node)]:
            row = feed(session, np.array([token], np.int64))  # one token, as plain decoding feeds it
        worst = max(worst, float(np.max(np.abs(row.astype(np.float64) - tree_logits[node]))))
    return worst


def unmeasured_parity(dtype: str) -> dict[str, str | bool] | None:
    """Why a graph of ``dtype`` cannot be checked here (no kernels on this machine's device), else None: bfloat16
    graphs run on CUDA only; exported without a GPU, their parity is left to scripts/gpu-check.sh."""
    if PRECISIONS[dtype].cpu_runs or _has_cuda():
        return None
    return {"measured": False, "reason": f"{dtype} graphs run on CUDA only and no CUDA device was seen at export: "
                                          "scripts/gpu-check.sh measures them on a GPU"}


def _has_cuda() -> bool:
    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
