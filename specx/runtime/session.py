"""ONNX Runtime sessions with the KV cache kept on the device.

One ``DecoderSession`` wraps a decoder graph and its KV-gather helper. Every pass goes through IO binding, on the CPU
exactly as on CUDA (only the device string differs), so the tests exercise the GPU code path::

    host                                  device (OrtValues)
    input_ids, position_ids, tree_mask -> bound as inputs (copied in)
                                          past_key_values.{i}.*  (batch, kv_heads, past, head_dim)
                                               |  decoder pass
                                          present.{i}.*          (batch, kv_heads, past+seq, head_dim)
    logits <- copied out                       |  commit(keep)
                                          past_key_values.{i}.*  (batch, kv_heads, past+len(keep), head_dim)

``commit()`` with no argument keeps every new position (the present becomes the past, no copy); ``commit(keep)``
keeps the listed new positions (an accepted tree path, in path order) by running the KV-gather graph on the device.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from specx.errors import BundleError, ContractError, InvalidArgumentError, ProviderError
from specx.graphs.contract import INPUT_IDS, KEEP, LOGITS, METADATA_KEY, POSITION_IDS, TREE_MASK, GraphContract

PROVIDERS = ("auto", "cuda", "cpu")
_ORT_PROVIDER = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
_NUMPY_KV = {"float32": np.float32, "float16": np.float16}
_QUIET = 4  # ORT logger severity FATAL: silences the expected CUDA probe failure on CPU-only machines


@dataclass(frozen=True)
class Placement:
    """Where sessions run: the ORT provider list and the device string for OrtValues."""

    name: str  # "cuda" | "cpu"
    device: str  # OrtValue device type: "cuda" | "cpu"

    @property
    def providers(self) -> list[str]:
        return [_ORT_PROVIDER[self.name]] if self.name == "cpu" else [_ORT_PROVIDER["cuda"], _ORT_PROVIDER["cpu"]]


def open_session(path: Path, provider: str, options: ort.SessionOptions | None = None) -> tuple[ort.InferenceSession, Placement]:
    """Create a session on ``provider`` (auto | cuda | cpu) and say where it really runs.

    onnxruntime silently falls back to the CPU when CUDA cannot be loaded, so the providers the session reports are
    checked: ``cuda`` that ends up on the CPU is an error, ``auto`` settles for the CPU.
    """
    if provider not in PROVIDERS:
        raise InvalidArgumentError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    options = options or default_session_options()
    wants_cuda = provider == "cuda" or (provider == "auto" and _ORT_PROVIDER["cuda"] in ort.get_available_providers())
    if provider == "cuda" and _ORT_PROVIDER["cuda"] not in ort.get_available_providers():
        raise ProviderError(
            "provider 'cuda' requested but this onnxruntime build has no CUDA support; "
            "install onnxruntime-gpu, or run with --provider cpu"
        )
    if not wants_cuda:
        cpu = Placement("cpu", "cpu")
        return _load(path, options, cpu.providers), cpu
    cuda = Placement("cuda", "cuda")
    if provider == "auto":
        ort.set_default_logger_severity(_QUIET)
    try:
        session = _load(path, options, cuda.providers)
    finally:
        ort.set_default_logger_severity(2)
    if _ORT_PROVIDER["cuda"] in session.get_providers():
        return session, cuda
    if provider == "cuda":
        raise ProviderError(
            "provider 'cuda' requested but onnxruntime could not load CUDA (missing CUDA/cuDNN libraries or no GPU); "
            "install the CUDA and cuDNN libraries onnxruntime-gpu needs, or run with --provider cpu"
        )
    return session, Placement("cpu", "cpu")


_LOAD_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.NoSuchFile, ort_state.NoModel,
                ort_state.InvalidProtobuf, ort_state.InvalidGraph, ort_state.RuntimeException)


def _load(path: Path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except _LOAD_ERRORS as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"cannot load graph {path}: {first_line}; re-export the bundle with `specx export`") from exc


def default_session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def check_graph(session: ort.InferenceSession, contract: GraphContract, graph: str) -> None:
    """The session's I/O must match the manifest's contract, and the contract in the file's metadata must agree."""
    contract.check_session(session.get_inputs(), session.get_outputs(), graph)
    embedded = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if embedded is None:
        raise ContractError(f"{graph} carries no specx contract in its metadata; re-export the bundle with `specx export`")
    if GraphContract.from_dict(json.loads(embedded)) != contract:
        raise ContractError(f"{graph}: the contract in the graph differs from the manifest's; re-export the bundle")


class DecoderSession:
    """A decoder graph plus its on-device KV cache (batch 1 in decoding; the graphs accept any batch)."""

    def __init__(self, decoder: ort.InferenceSession, gather: ort.InferenceSession, contract: GraphContract,
                 placement: Placement, batch: int = 1):
        self.contract = contract
        self.placement = placement
        self.batch = batch
        self._decoder = decoder
        self._gather_session = gather
        self._kv_type = _NUMPY_KV[contract.kv_dtype]
        self._past: list[ort.OrtValue] = []
        self._present: list[ort.OrtValue] | None = None
        self.past_len = 0
        self._pending_len = 0
        self.calls = 0
        self.seconds = 0.0  # wall time inside decoder and gather runs
        self.reset()

    # -- cache lifecycle ---------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty the cache (start of a new sequence)."""
        shape = (self.batch, self.contract.num_kv_heads, 0, self.contract.head_dim)  # (batch, heads, 0, head_dim)
        self._past = [
            ort.OrtValue.ortvalue_from_shape_and_type(shape, self._kv_type, self.placement.device, 0)
            for _ in self.contract.past_input_names
        ]
        self._present = None
        self.past_len = 0
        self._pending_len = 0

    def reset_counters(self) -> None:
        self.calls = 0
        self.seconds = 0.0

    # -- passes ------------------------------------------------------------------------------------------------
    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, tree_mask: np.ndarray) -> np.ndarray:
        """Run one pass over new tokens against the committed cache; return logits (batch, seq, vocab) float32.

        The pass's KV stays pending on the device until ``commit``; a second forward without commit discards it.
        """
        seq = input_ids.shape[1]
        expected_mask = (self.batch, 1, seq, self.past_len + seq)
        if input_ids.shape != (self.batch, seq) or position_ids.shape != input_ids.shape or tree_mask.shape != expected_mask:
            raise InvalidArgumentError(
                f"pass shapes do not fit the cache: input_ids {input_ids.shape}, position_ids {position_ids.shape}, "
                f"tree_mask {tree_mask.shape} (expected {expected_mask})"
            )
        io = self._decoder.io_binding()
        io.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input(POSITION_IDS, np.ascontiguousarray(position_ids, dtype=np.int64))
        io.bind_cpu_input(TREE_MASK, np.ascontiguousarray(tree_mask, dtype=bool))
        for name, value in zip(self.contract.past_input_names, self._past):
            io.bind_ortvalue_input(name, value)
        io.bind_output(LOGITS, "cpu")
        for name in self.contract.present_output_names:
            io.bind_output(name, self.placement.device, 0)
        start = time.perf_counter()
        self._decoder.run_with_iobinding(io)
        outputs = io.get_outputs()
        logits = outputs[0].numpy()  # (batch, seq, vocab)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self._present = outputs[1:]  # (batch, kv_heads, past+seq, head_dim) each
        self._pending_len = seq
        return logits

    def commit(self, keep: Sequence[int] | np.ndarray | None = None) -> None:
        """Make the last pass's KV part of the cache: all new positions, or only ``keep`` (indices into the pass)."""
        if self._present is None:
            raise InvalidArgumentError("commit() without a forward() pass to commit")
        present, self._present = self._present, None
        if keep is None:
            self._past, self.past_len = present, self.past_len + self._pending_len
            return
        keep = np.asarray(keep, dtype=np.int64)
        if keep.ndim != 1 or np.any(keep < 0) or np.any(keep >= self._pending_len):
            raise InvalidArgumentError(f"keep indices must lie in [0, {self._pending_len}) for the last pass")
        self._past = self._gather(present, np.concatenate([np.arange(self.past_len, dtype=np.int64),
                                                           self.past_len + keep]))
        self.past_len += int(keep.size)

    def select(self, positions: Sequence[int] | np.ndarray) -> None:
        """Keep only the listed committed cache positions, in the order given (on the device)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.ndim != 1 or np.any(positions < 0) or np.any(positions >= self.past_len):
            raise InvalidArgumentError(f"cache positions must lie in [0, {self.past_len})")
        if positions.size == self.past_len and np.array_equal(positions, np.arange(self.past_len)):
            return
        self._present = None
        self._past = self._gather(self._past, positions)
        self.past_len = int(positions.size)

    def _gather(self, values: list[ort.OrtValue], index: np.ndarray) -> list[ort.OrtValue]:
        """Run the KV-gather graph: every layer's (batch, kv_heads, total, head_dim) -> (..., len(index), ...)."""
        io = self._gather_session.io_binding()
        for name, value in zip(self.contract.present_output_names, values):
            io.bind_ortvalue_input(name, value)
        io.bind_cpu_input(KEEP, index)
        for name in self.contract.past_input_names:
            io.bind_output(name, self.placement.device, 0)
        start = time.perf_counter()
        self._gather_session.run_with_iobinding(io)
        outputs = io.get_outputs()
        self.seconds += time.perf_counter() - start
        return outputs

    def cache_arrays(self) -> list[np.ndarray]:
        """Copy the committed cache to the host (for tests and debugging; never used while decoding)."""
        return [v.numpy() for v in self._past]
