"""ONNX Runtime sessions with a static KV cache kept on the device.

One ``DecoderSession`` wraps a decoder graph and its KV-commit helper. Every pass goes through IO binding, on the CPU
exactly as on CUDA (only the device string differs), so the tests exercise the GPU code path::

    host                                  device (OrtValues, allocated once per generation, never copied)
    input_ids, position_ids, tree_mask -> bound as inputs (copied in)
                                          cache.{i}.key/value  (batch, kv_heads, capacity, head_dim)
                                               |  decoder pass: bound as past AND present; the pass's K/V are
                                               |  written in place at rows [past_len, past_len + seq)
    logits <- copied out                       |  commit(keep): the accepted rows move to [past_len, ...) in place
                                               |  (KV-commit graph: Gather + TensorScatter of the moved rows only)

``commit()`` with no argument keeps every new position (nothing moves); ``commit(keep)`` keeps the listed new
positions (an accepted tree path, in path order). Rows past ``past_len`` are garbage the next pass overwrites.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from specx.errors import BundleError, CapacityError, ContractError, InvalidArgumentError, ProviderError
from specx.graphs.contract import (COMMIT_DST, COMMIT_SRC, INPUT_IDS, LOGITS, METADATA_KEY, NEXT_TOKENS, PAST_LENGTH,
                                   POSITION_IDS, TOP_PROBS, TOP_TOKENS, TREE_MASK, GraphContract)
from specx.runtime.tree import bucket_size, pad_rows

PROVIDERS = ("auto", "cuda", "cpu")
_ORT_PROVIDER = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
_NUMPY_KV = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # bfloat16: its bit pattern
ONNX_BFLOAT16 = 16  # TensorProto.BFLOAT16 (the runtime does not import onnx)
_QUIET = 4  # ORT logger severity FATAL: silences the expected CUDA probe failure on CPU-only machines
REUSED_LOGITS_ROWS = 64  # logits buffers of passes up to this many rows are kept for reuse
CACHE_BLOCK = 64  # cache capacities are rounded up to a multiple of this many positions
# What each kind of pass brings back to the host (the others stay unbound: ORT keeps them on the device)
_PASS_OUTPUTS = {LOGITS: (LOGITS,), NEXT_TOKENS: (NEXT_TOKENS,), TOP_TOKENS: (TOP_TOKENS, TOP_PROBS)}


@dataclass(frozen=True)
class Placement:
    """Where sessions run: the ORT provider list and the device string for OrtValues."""

    name: str  # "cuda" | "cpu"
    device: str  # OrtValue device type: "cuda" | "cpu"

    @property
    def providers(self) -> list[str]:
        return [_ORT_PROVIDER[self.name]] if self.name == "cpu" else [_ORT_PROVIDER["cuda"], _ORT_PROVIDER["cpu"]]


def open_session(path: Path, provider: str, options: ort.SessionOptions | None = None,
                 cuda_graphs: bool = False) -> tuple[ort.InferenceSession, Placement]:
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
    providers: list = cuda.providers
    if cuda_graphs:  # passes of fixed shapes and addresses are captured once and replayed (gpu_graph_id)
        providers = [(_ORT_PROVIDER["cuda"], {"enable_cuda_graph": "1"}), _ORT_PROVIDER["cpu"]]
    if provider == "auto":
        ort.set_default_logger_severity(_QUIET)
    try:
        session = _load(path, options, providers)
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


def _load(path: Path, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except ort_state.NotImplemented as exc:  # a node without a kernel on the providers that loaded (bf16 on a CPU)
        raise ProviderError(f"cannot run graph {path} here: {_first_line(exc)}") from exc
    except _LOAD_ERRORS as exc:
        raise BundleError(f"cannot load graph {path}: {_first_line(exc)}; re-export the bundle with `specx export`") \
            from exc


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def cuda_available(provider: str) -> bool:
    """Whether ``provider`` ("auto", "cuda" or "cpu") may give a CUDA session: onnxruntime-gpu lists the provider
    (whether its libraries load is known only when a session opens)."""
    return provider != "cpu" and _ORT_PROVIDER["cuda"] in ort.get_available_providers()


def default_session_options(threads: int | None = None, spinning: bool = True) -> ort.SessionOptions:
    """``spinning=False`` when several sessions take turns (target and draft): an idle session's spinning threads
    would otherwise hold the cores the running one needs."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        if threads < 1:
            raise InvalidArgumentError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = threads
    return options


def cap_threads(threads: int | None) -> tuple[int | None, str | None]:
    """``threads`` no higher than this machine's logical cores (more only oversubscribe them; 100,000 hung creating
    threads): the count to use, and a warning to show when it was lowered."""
    cores = os.cpu_count()
    if threads is None or cores is None or threads <= cores:
        return threads, None
    return cores, f"{threads} threads asked for, but this machine has {cores} cores: using {cores}"


def check_graph(session: ort.InferenceSession, contract: GraphContract, graph: str) -> None:
    """The session's I/O must match the manifest's contract, and the contract in the file's metadata must agree."""
    contract.check_session(session.get_inputs(), session.get_outputs(), graph)
    embedded = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if embedded is None:
        raise ContractError(f"{graph} carries no specx contract in its metadata; re-export the bundle with `specx export`")
    if GraphContract.from_dict(json.loads(embedded)) != contract:
        raise ContractError(f"{graph}: the contract in the graph differs from the manifest's; re-export the bundle")


def _pad_extra(extra: Mapping[str, np.ndarray] | None, seq: int, rows: int) -> Mapping[str, np.ndarray] | None:
    """Extra inputs for a pass of ``seq`` rows padded to ``rows``: those carrying the pass's rows get zero rows after
    them (what the dummy rows read; their outputs are dropped); those without rows stay empty."""
    if not extra:
        return extra
    return {name: np.concatenate([value, np.zeros((value.shape[0], rows - seq, *value.shape[2:]), value.dtype)],
                                 axis=1) if value.shape[1] == seq else value  # (batch, rows, width)
            for name, value in extra.items()}


CUDA_GRAPH_SKIP = -1  # ONNX Runtime's gpu_graph_id for a run that is neither captured nor replayed


def _graph_options(graph_id: int) -> ort.RunOptions:
    """Run options naming the CUDA graph a run captures or replays (``gpu_graph_id``; -1: none)."""
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


@dataclass(frozen=True)
class _FixedPass:
    """One bucket's pass on buffers bound once: what a CUDA graph captures (inputs refilled in place)."""

    binding: ort.IOBinding
    inputs: dict[str, ort.OrtValue]  # input_ids, position_ids, tree_mask (capacity-wide), past_length
    outputs: dict[str, ort.OrtValue]  # what the pass brings back, on the device
    run_options: ort.RunOptions  # gpu_graph_id where captured


class DecoderSession:
    """A decoder graph plus its static on-device KV cache (batch 1 in decoding; the graphs accept any batch).

    ``reserve(rows)`` allocates the cache before a generation (grown, never shrunk: memory is fixed while
    generating); a pass beyond the reserved rows is a CapacityError.
    """

    def __init__(self, decoder: ort.InferenceSession, committer: ort.InferenceSession, contract: GraphContract,
                 placement: Placement, batch: int = 1, fixed_buckets: Sequence[int] = (), capture: bool = False,
                 pad_to_buckets: bool = False, max_capacity: int | None = None):
        """``max_capacity``: the rows a cache may hold at most (the model's context, where the rotary tables end: a
        static-shape graph attends over the whole capacity, so a capacity rounded past them fails).
        ``fixed_buckets``: passes of these lengths run on device buffers bound once (static-shape graphs only),
        captured as CUDA graphs when ``capture`` (the session was opened with ``cuda_graphs``); ``pad_to_buckets``:
        a shorter pass is padded with dummy rows to the next of them where the cache has room (a draft's passes,
        whose lengths vary). Extra inputs (a feature draft's features, hidden) take part where each has the pass's
        rows or none (``_carriers``): padded with zero rows, and on fixed buffers per which of them carry rows."""
        if fixed_buckets and not contract.static_shapes:
            raise InvalidArgumentError("fixed-buffer passes need a static-shape graph (CUDA formats: --dtype fp16, "
                                       "fp16-int8 or fp16-int4)")
        self.fixed_buckets = frozenset(fixed_buckets)
        self._pad_to = tuple(sorted(fixed_buckets)) if pad_to_buckets else ()
        self._capture = capture
        # a run without gpu_graph_id is captured as graph 0 by a CUDA-graph session (ONNX Runtime's default
        # annotation) and replayed whatever its shapes: passes off the fixed buffers say -1 (never captured)
        self._uncaptured = _graph_options(CUDA_GRAPH_SKIP) if capture else None
        self._fixed: dict[tuple[int, str, tuple[bool, ...]], _FixedPass] = {}  # (rows, outputs, extra carriers)
        self._graph_ids = 0  # CUDA graph ids handed out so far (a reallocated cache needs new captures)
        self.contract = contract
        self.placement = placement
        self.batch = batch
        self._decoder = decoder
        self._committer = committer
        self._kv_type = _NUMPY_KV[contract.kv_dtype]
        self._cache: list[ort.OrtValue] = []  # one per past name: (batch, kv_heads, capacity, head_dim)
        self._bindings: dict[str, ort.IOBinding] = {}  # per kind of pass: the cache bound once per allocation
        self._host: dict[tuple[int, str], dict[str, tuple[np.ndarray, ort.OrtValue]]] = {}  # (seq, wanted) -> buffers
        self._extra_inputs = contract.extra_inputs
        self.outputs: dict[str, np.ndarray] = {}  # the last pass's outputs besides logits (features, hidden_states)
        self.capacity = 0
        self.max_capacity = max_capacity
        self.past_len = 0
        self._pending_len = 0
        self.token_ids: list[int] = []  # the committed rows' tokens (batch 1): what a later prompt may reuse
        self._pending_ids: list[int] = []
        self.calls = 0
        self.seconds = 0.0  # wall time inside decoder and commit runs
        self.reset()

    # -- cache lifecycle ---------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty the cache (start of a new sequence); its buffers are kept."""
        self.rewind(0)

    def rewind(self, rows: int) -> None:
        """Keep only the first ``rows`` committed rows (free: later rows are simply overwritten)."""
        if not 0 <= rows <= self.past_len:
            raise InvalidArgumentError(f"cannot rewind to {rows} rows: the cache holds {self.past_len}")
        self.past_len = rows
        self._pending_len = 0
        self.token_ids = self.token_ids[:rows]
        self._pending_ids = []

    def reuse(self, prefix: Sequence[int]) -> int:
        """Keep the longest committed prefix that ``prefix`` starts with; return its length (batch 1)."""
        common = 0
        for cached, wanted in zip(self.token_ids, prefix):
            if cached != wanted:
                break
            common += 1
        self.rewind(common)
        return common

    def reset_counters(self) -> None:
        self.calls = 0
        self.seconds = 0.0

    def reserve(self, rows: int) -> None:
        """Make the cache hold at least ``rows`` rows (rounded up to CACHE_BLOCK, at least double the last size).
        Growing reallocates, so it is allowed on an empty cache only."""
        if rows <= self.capacity:
            return
        if self.past_len:
            raise InvalidArgumentError("reserve() a larger cache only on an empty cache (call reset() first)")
        # at least double: a growing conversation (reuse of earlier turns) reallocates, and so recomputes, rarely
        capacity = max(-(-rows // CACHE_BLOCK) * CACHE_BLOCK, 2 * self.capacity)
        if self.max_capacity is not None:
            capacity = max(rows, min(capacity, self.max_capacity))
        # + the rows a padded pass's dummies write past the context (contract.spare_rows): never committed
        shape = (self.batch, self.contract.num_kv_heads, capacity + self.contract.spare_rows, self.contract.head_dim)
        self._cache = [self._zeros(shape) for _ in self.contract.past_input_names]
        self.capacity = capacity
        # one binding per kind of pass (logits or next_tokens brought back), the cache bound once in each
        self._bindings = {wanted: self._bind_cache(self._decoder.io_binding()) for wanted in _PASS_OUTPUTS}
        self._fixed = {}  # new addresses: fixed passes are bound (and captured) anew

    def _zeros(self, shape: tuple[int, ...]) -> ort.OrtValue:
        """A zeroed cache buffer on the device; bfloat16 (which numpy lacks) is allocated by its ONNX type and zeroed
        through its 16-bit pattern."""
        zeros = np.zeros(shape, self._kv_type)
        if self.contract.kv_dtype != "bfloat16":
            return ort.OrtValue.ortvalue_from_numpy(zeros, self.placement.device, 0)
        value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), ONNX_BFLOAT16, self.placement.device, 0)
        value.update_inplace(zeros)
        return value

    def _bind_cache(self, io: ort.IOBinding) -> ort.IOBinding:
        for past, present, value in zip(self.contract.past_input_names, self.contract.present_output_names, self._cache):
            io.bind_ortvalue_input(past, value)  # (batch, kv_heads, capacity, head_dim), written in place
            io.bind_ortvalue_output(present, value)
        return io

    # -- passes ------------------------------------------------------------------------------------------------
    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, tree_mask: np.ndarray,
                extra: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Run one pass over new tokens against the committed cache; return logits (batch, seq, vocab) float32.

        ``extra``: the contract's other inputs (a feature draft's features and hidden). The contract's other
        per-token outputs (features, hidden_states) land in ``self.outputs`` (valid until the next pass of the same
        length: copy what you keep). The pass's KV stays pending until ``commit``; a second forward without commit
        overwrites it.
        """
        buffers = self._run(input_ids, position_ids, tree_mask, extra, LOGITS)
        return buffers[LOGITS][0].copy()  # (batch, seq, vocab); the buffer is reused by the next pass of this length

    def forward_tokens(self, input_ids: np.ndarray, position_ids: np.ndarray, tree_mask: np.ndarray,
                       extra: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """``forward`` for greedy decoding: return each row's argmax (batch, seq) int64, computed in the graph where
        it has ``next_tokens`` (the logits then never leave the device), else from the logits here."""
        if not self.contract.has_next_tokens:
            return np.argmax(self.forward(input_ids, position_ids, tree_mask, extra), axis=-1)
        buffers = self._run(input_ids, position_ids, tree_mask, extra, NEXT_TOKENS)
        return buffers[NEXT_TOKENS][0].copy()  # (batch, seq)

    def forward_top(self, input_ids: np.ndarray, position_ids: np.ndarray, tree_mask: np.ndarray,
                    extra: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``forward`` for a draft growing a tree from its top tokens: (top_tokens int64, top_probs float32), each
        (batch, seq, k), most likely first, computed in the graph (``contract.top_k`` > 0): no logits leave it."""
        if not self.contract.top_k:
            raise InvalidArgumentError("this graph computes no top tokens; use forward()")
        buffers = self._run(input_ids, position_ids, tree_mask, extra, TOP_TOKENS)
        return buffers[TOP_TOKENS][0].copy(), buffers[TOP_PROBS][0].copy()

    def _run(self, input_ids: np.ndarray, position_ids: np.ndarray, tree_mask: np.ndarray,
             extra: Mapping[str, np.ndarray] | None, wanted: str) -> dict[str, tuple[np.ndarray, ort.OrtValue]]:
        """One pass with what ``wanted`` names (``_PASS_OUTPUTS``) and the extra outputs bound to host buffers; the
        graph's other per-token outputs stay unbound (ORT keeps them on the device)."""
        seq = input_ids.shape[1]
        total = self.past_len + seq
        expected_mask = (self.batch, 1, seq, total)
        if input_ids.shape != (self.batch, seq) or position_ids.shape != input_ids.shape or tree_mask.shape != expected_mask:
            raise InvalidArgumentError(
                f"pass shapes do not fit the cache: input_ids {input_ids.shape}, position_ids {position_ids.shape}, "
                f"tree_mask {tree_mask.shape} (expected {expected_mask})"
            )
        if total > self.capacity:
            raise CapacityError(f"a pass to row {total} overflows the KV cache of {self.capacity} rows; "
                                "reserve() enough rows before the first pass")
        carriers = self._carriers(extra, seq)
        rows = self._padded_rows(seq) if carriers is not None else seq
        if rows == seq:
            return self._pass(input_ids, position_ids, tree_mask, extra, carriers, wanted)
        # a target exact only on padded passes (contract.min_rows): the dummies may reach the spare rows past the
        # capacity checked above; a draft's pass padded to a fixed bucket; dummies are never committed
        buffers = self._pass(*pad_rows(input_ids, position_ids, tree_mask, rows), _pad_extra(extra, seq, rows),
                             carriers, wanted)  # padding keeps which extra inputs carry the rows
        self._pending_len, self._pending_ids = seq, self._pending_ids[:seq]
        self.outputs = {name: host[:, :seq] for name, host in self.outputs.items()}
        return {name: (host[:, :seq], value) for name, (host, value) in buffers.items()}  # (batch, seq, ...)

    def _carriers(self, extra: Mapping[str, np.ndarray] | None, seq: int) -> tuple[bool, ...] | None:
        """Which extra inputs carry the pass's rows ((batch, seq, width); the others (batch, 0, width)), or None
        where one carries another count (such a pass is neither padded nor run on fixed buffers)."""
        if not self._extra_inputs:
            return ()
        if extra is None or any(spec.name not in extra for spec in self._extra_inputs):
            return None  # _pass says which input is missing
        rows = [extra[spec.name].shape[1] for spec in self._extra_inputs]
        return tuple(r == seq for r in rows) if all(r in (0, seq) for r in rows) else None

    def _padded_rows(self, seq: int) -> int:
        """The rows a pass of ``seq`` runs with: the contract's padding, then the next fixed bucket where asked
        (``pad_to_buckets``) and the cache has room for its dummies (else unpadded: uncaptured)."""
        rows = self.contract.padded_rows(seq)
        return bucket_size(rows, self._pad_to, self.capacity - self.past_len) if self._pad_to else rows

    def _pass(self, input_ids: np.ndarray, position_ids: np.ndarray, tree_mask: np.ndarray,
              extra: Mapping[str, np.ndarray] | None, carriers: tuple[bool, ...] | None,
              wanted: str) -> dict[str, tuple[np.ndarray, ort.OrtValue]]:
        """Run a pass whose shapes ``_run`` checked: on fixed buffers where its length is a bucket and its extra
        inputs each carry its rows or none (``carriers``), else bound anew."""
        seq = input_ids.shape[1]
        if carriers is not None and seq in self.fixed_buckets:
            return self._run_fixed(input_ids, position_ids, tree_mask, extra, carriers, wanted)
        io = self._bindings[wanted]
        io.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input(POSITION_IDS, np.ascontiguousarray(position_ids, dtype=np.int64))
        if self.contract.static_shapes:  # the mask as wide as the cache, the committed length as a tensor
            tree_mask = self._wide(tree_mask)
            io.bind_cpu_input(PAST_LENGTH, np.full(self.batch, self.past_len, dtype=np.int64))
        io.bind_cpu_input(TREE_MASK, np.ascontiguousarray(tree_mask, dtype=bool))
        for spec in self._extra_inputs:
            if extra is None or spec.name not in extra:
                raise InvalidArgumentError(f"this graph needs the input {spec.name!r}")
            io.bind_cpu_input(spec.name, np.ascontiguousarray(extra[spec.name], dtype=np.float32))
        buffers = self._buffers(seq, wanted)
        for name, (_, value) in buffers.items():
            io.bind_ortvalue_output(name, value)
        start = time.perf_counter()
        self._decoder.run_with_iobinding(io, self._uncaptured)
        return self._finished(buffers, wanted, input_ids, start)

    def _finished(self, buffers: dict[str, tuple[np.ndarray, ort.OrtValue]], wanted: str, input_ids: np.ndarray,
                  start: float) -> dict[str, tuple[np.ndarray, ort.OrtValue]]:
        """A pass's bookkeeping: its other outputs kept, its time and call counted, its rows pending a commit."""
        self.outputs = {name: host for name, (host, _) in buffers.items() if name not in _PASS_OUTPUTS[wanted]}
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self._pending_len = input_ids.shape[1]
        self._pending_ids = input_ids[0].tolist() if self.batch == 1 else []
        return buffers

    def _wide(self, tree_mask: np.ndarray) -> np.ndarray:
        """A pass's mask (batch, 1, seq, total) as wide as the cache (static-shape graphs); the rest False."""
        wide = np.zeros((*tree_mask.shape[:3], self.capacity), dtype=bool)  # (batch, 1, seq, capacity)
        wide[..., :tree_mask.shape[3]] = tree_mask
        return wide

    def _run_fixed(self, input_ids: np.ndarray, position_ids: np.ndarray, tree_mask: np.ndarray,
                   extra: Mapping[str, np.ndarray] | None, carriers: tuple[bool, ...],
                   wanted: str) -> dict[str, tuple[np.ndarray, ort.OrtValue]]:
        """A pass on device buffers bound once per (length, outputs, extra inputs carrying rows): the inputs are
        copied into them in place, so every pass of a bucket has the same shapes and addresses (captured once as a
        CUDA graph, then replayed)."""
        seq = input_ids.shape[1]
        key = (seq, wanted, carriers)
        fixed = self._fixed.get(key) or self._bind_fixed(seq, wanted, carriers)
        feeds = {INPUT_IDS: np.ascontiguousarray(input_ids, dtype=np.int64),
                 POSITION_IDS: np.ascontiguousarray(position_ids, dtype=np.int64), TREE_MASK: self._wide(tree_mask),
                 PAST_LENGTH: np.full(self.batch, self.past_len, dtype=np.int64)}
        for spec, carries in zip(self._extra_inputs, carriers):
            if carries:  # (batch, seq, width); an input without rows keeps its empty buffer
                feeds[spec.name] = np.ascontiguousarray(extra[spec.name], dtype=np.float32)
        for name, value in feeds.items():
            fixed.inputs[name].update_inplace(value)
        start = time.perf_counter()
        self._decoder.run_with_iobinding(fixed.binding, fixed.run_options)
        host = {name: (value.numpy(), value) for name, value in fixed.outputs.items()}  # device -> host copies
        return self._finished(host, wanted, input_ids, start)

    def _bind_fixed(self, seq: int, wanted: str, carriers: tuple[bool, ...]) -> "_FixedPass":
        device = self.placement.device

        def buffer(shape: tuple[int, ...], dtype: type) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), device, 0)

        b = self.batch
        inputs = {INPUT_IDS: buffer((b, seq), np.int64), POSITION_IDS: buffer((b, seq), np.int64),
                  TREE_MASK: buffer((b, 1, seq, self.capacity), np.bool_), PAST_LENGTH: buffer((b,), np.int64)}
        for spec, carries in zip(self._extra_inputs, carriers):  # (batch, seq or 0, width) float32
            inputs[spec.name] = buffer((b, seq if carries else 0, int(spec.shape[-1])), np.float32)
        outputs = {name: buffer((b, seq, *tail), dtype) for name, (tail, dtype) in self._output_shapes(wanted).items()}
        io = self._bind_cache(self._decoder.io_binding())
        for name, value in inputs.items():
            io.bind_ortvalue_input(name, value)
        for name, value in outputs.items():
            io.bind_ortvalue_output(name, value)
        for name, (tail, dtype) in self._unread_outputs(wanted).items():  # bound too: a captured graph keeps
            io.bind_ortvalue_output(name, buffer((b, seq, *tail), dtype))  # every address; never read back
        options = ort.RunOptions()
        if self._capture:
            self._graph_ids += 1
            options = _graph_options(self._graph_ids)
        fixed = self._fixed[(seq, wanted, carriers)] = _FixedPass(io, inputs, outputs, options)
        return fixed

    def _output_shapes(self, wanted: str) -> dict[str, tuple[tuple[int, ...], type]]:
        """Per output this kind of pass brings back: its shape after (batch, seq), and dtype."""
        shapes = self._all_output_shapes()
        return {name: shapes[name] for name in [*_PASS_OUTPUTS[wanted], *(s.name for s in self.contract.extra_outputs)]}

    def _unread_outputs(self, wanted: str) -> dict[str, tuple[tuple[int, ...], type]]:
        """The graph's per-token outputs this kind of pass does not bring back (logits of a greedy pass, ...)."""
        read = set(self._output_shapes(wanted))
        names = {s.name for s in self.contract.outputs}
        return {name: shape for name, shape in self._all_output_shapes().items() if name in names - read}

    def _all_output_shapes(self) -> dict[str, tuple[tuple[int, ...], type]]:
        shapes = {LOGITS: ((self.contract.vocab_size,), np.float32), NEXT_TOKENS: ((), np.int64),
                  TOP_TOKENS: ((self.contract.top_k,), np.int64), TOP_PROBS: ((self.contract.top_k,), np.float32)}
        shapes.update({s.name: ((int(s.shape[-1]),), np.float32) for s in self.contract.extra_outputs})
        return shapes

    def _buffers(self, seq: int, wanted: str) -> dict[str, tuple[np.ndarray, ort.OrtValue]]:
        """Host arrays the pass writes its per-token outputs into (OrtValues over the arrays' memory, no extra
        copy): what ``wanted`` names (``_PASS_OUTPUTS``) and the contract's other outputs (batch, seq, width)."""
        key = (seq, wanted)
        if key in self._host:
            return self._host[key]
        buffers = {}
        for name, (tail, dtype) in self._output_shapes(wanted).items():
            host = np.empty((self.batch, seq, *tail), dtype=dtype)
            buffers[name] = (host, ort.OrtValue.ortvalue_from_numpy(host, "cpu", 0))
        if seq <= REUSED_LOGITS_ROWS:  # steps and trees; a long prompt's buffers are not kept
            self._host[key] = buffers
        return buffers

    def commit(self, keep: Sequence[int] | np.ndarray | None = None) -> None:
        """Make the last pass's KV part of the cache: all new positions, or only ``keep`` (indices into the pass,
        in path order)."""
        if not self._pending_len:
            raise InvalidArgumentError("commit() without a forward() pass to commit")
        pending, self._pending_len = self._pending_len, 0
        if keep is None:
            self.past_len += pending
            self.token_ids += self._pending_ids
            return
        keep = np.asarray(keep, dtype=np.int64)
        if keep.ndim != 1 or np.any(keep < 0) or np.any(keep >= pending) or np.unique(keep).size != keep.size:
            raise InvalidArgumentError(f"keep indices must be distinct and lie in [0, {pending}) for the last pass")
        self._keep_rows(self.past_len, self.past_len + keep)

    def select(self, positions: Sequence[int] | np.ndarray) -> None:
        """Keep only the listed committed cache positions, in the order given (on the device)."""
        positions = np.asarray(positions, dtype=np.int64)
        if (positions.ndim != 1 or np.any(positions < 0) or np.any(positions >= self.past_len)
                or np.unique(positions).size != positions.size):
            raise InvalidArgumentError(f"cache positions must be distinct and lie in [0, {self.past_len})")
        self._pending_len = 0
        self._pending_ids = []
        self._keep_rows(0, positions)

    def _keep_rows(self, first: int, rows: np.ndarray) -> None:
        """Rows [0, first) stay; ``rows`` (absolute, in order) become rows first, first + 1, ... Rows already in
        place are not moved; the others move in one KV-commit run."""
        target = first + np.arange(rows.size, dtype=np.int64)
        misplaced = np.flatnonzero(rows != target)
        if misplaced.size:
            start = int(misplaced[0])
            self._move(rows[start:], first + start)
        pool = self.token_ids + self._pending_ids
        if self.batch == 1:
            self.token_ids = pool[:first] + [pool[int(r)] for r in rows]
        self._pending_ids = []
        self.past_len = first + int(rows.size)

    def _move(self, src: np.ndarray, dst: int) -> None:
        """Run the KV-commit graph: every layer's rows ``src`` -> rows [dst, dst + len(src)), in place."""
        io = self._committer.io_binding()
        for past, present, value in zip(self.contract.past_input_names, self.contract.present_output_names, self._cache):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)
        io.bind_cpu_input(COMMIT_SRC, np.ascontiguousarray(src, dtype=np.int64))
        io.bind_cpu_input(COMMIT_DST, np.full(self.batch, dst, dtype=np.int64))
        start = time.perf_counter()
        self._committer.run_with_iobinding(io)
        self.seconds += time.perf_counter() - start

    def cache_arrays(self) -> list[np.ndarray]:
        """Copy the committed cache to the host (for tests and debugging; never used while decoding)."""
        return [v.numpy()[:, :, : self.past_len] for v in self._cache]
