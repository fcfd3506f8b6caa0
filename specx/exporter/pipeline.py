"""`specx export`: target (+ draft) -> one self-contained bundle directory.

The bundle is built in a hidden temporary directory beside the output and renamed into place at the end, so an
interrupted export never leaves a directory that looks like a valid bundle (specx.runtime.swap: an existing output
is replaced only when it is a specx bundle, and a swap cut short is completed or undone by the next export or load).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

import specx
from specx.errors import ExportError, InvalidArgumentError
from specx.exporter.adapters import ArchitectureAdapter, adapter_for
from specx.exporter.derived import PREFIX as DERIVED_PREFIX
from specx.exporter.derived import DerivedDraft, truncate_layers
from specx.exporter.ngram_build import DEFAULT_SAMPLE_TOKENS, build_ngram
from specx.exporter.onnx_export import DEFAULT_OPSET, commit_path, export_decoder
from specx.exporter.sources import LoadedModel, load_source
from specx.exporter.validate import unmeasured_parity, validate_decoder
from specx.graphs.contract import DRAFT_TOP_K, EXACT_MIN_ROWS, EXACT_ROW_MULTIPLE
from specx.graphs.passes import weight_bytes
from specx.graphs.decoder import uses_gqa
from specx.graphs.precision import CUDA, PRECISIONS, Precision
from specx.graphs.quantize import (ACCURACY_LEVEL, ACCURACY_LEVELS, BLOCK_SIZE, BLOCK_SIZES, EXACT_ACCURACY_LEVEL,
                                   INT8_COMPUTE_LEVEL, quantize_built, scheme, unquantized_path)
from specx.runtime.bundle import bundle_name, specx_home
from specx.runtime.integrity import record_files
from specx.runtime.manifest import DTYPES, Manifest, ModelEntry, NgramEntry, TokenizerEntry
from specx.runtime.swap import STAGING, check_replaceable, recover, replace_bundle, sibling

NO_DRAFT = "none"
TOKENIZER_FILE = "tokenizer.json"
NGRAM_FILE = "ngram.npz"
MIN_OPSET = 18  # Split with num_outputs
PAIRED_INT4_BLOCK, PAIRED_INT8_BLOCK = 32, 64  # the largest blocks MatMulNBits computes one row like a pair at

Progress = Callable[[str], ContextManager[None]]
Bars = Callable[[str, int], Any]  # (name, total) -> an object with update(n) and close()


def no_progress(_: str) -> ContextManager[None]:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class ExportRequest:
    source: str
    draft: str | None = None  # None = the family's default draft; "none" = no draft
    output: Path | None = None
    dtype: str = "auto"  # auto or one of specx.graphs.precision.DTYPES
    opset: int = DEFAULT_OPSET
    ngram_tokens: int = DEFAULT_SAMPLE_TOKENS  # tokens of the target's own text for the n-gram table (0: none)
    ngram_corpus: tuple[Path, ...] = ()  # text files added to the n-gram table
    quant_accuracy: int | None = None  # MatMulNBits accuracy level of a quantized target (0: exact trees); None:
                                       # 4 for the CPU formats (int8 compute), 0 for the CUDA ones (fp16-intN)
    quant_block: int = BLOCK_SIZE  # MatMulNBits block size of a quantized target


def short_name(source: str) -> str:
    """A source as progress messages name it: a local file or directory by its last component (one terminal line);
    a hub id as it is."""
    path = Path(source).expanduser()
    return path.name if path.exists() else source


def resolve_dtype(dtype: str) -> str:
    if dtype == "auto":
        return "fp16" if torch.cuda.is_available() else "fp32"
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"unknown dtype {dtype!r}; use auto, {' or '.join(DTYPES)}")
    return dtype


def resolve_draft(draft: str | None, adapter: ArchitectureAdapter) -> str | None:
    """The draft source to export, or None for a bundle without a draft."""
    if draft is None:
        if adapter.default_draft is None:
            raise InvalidArgumentError(
                f"{adapter.spec.model_type} models have no default draft; pass --draft SOURCE, or --draft none"
            )
        return adapter.default_draft
    if draft.lower() == NO_DRAFT:
        return None
    return draft


def export_bundle(request: ExportRequest, progress: Progress = no_progress, bars: Bars | None = None) -> Path:
    """``progress(step)`` wraps each step; ``bars(name, total)`` gives a counted bar (n-gram sampling)."""
    if request.ngram_tokens < 0:
        raise InvalidArgumentError(f"--ngram-tokens must be >= 0, got {request.ngram_tokens}")
    for path in request.ngram_corpus:
        if not Path(path).is_file():
            raise InvalidArgumentError(f"--ngram-corpus file {path} does not exist")
    if request.quant_block not in BLOCK_SIZES:
        raise InvalidArgumentError(f"--quant-block must be one of {BLOCK_SIZES}, got {request.quant_block}")
    if request.quant_accuracy is not None and request.quant_accuracy not in ACCURACY_LEVELS:
        raise InvalidArgumentError(f"--quant-accuracy must be one of {ACCURACY_LEVELS}, got {request.quant_accuracy}")
    if request.opset < MIN_OPSET:
        raise InvalidArgumentError(f"--opset must be at least {MIN_OPSET}, got {request.opset}")
    dtype = resolve_dtype(request.dtype)
    output = (request.output or specx_home() / bundle_name(request.source)).expanduser()
    _check_output(output)
    with progress(f"loading {short_name(request.source)}"):
        target = load_source(request.source, dtype)
    target_adapter = adapter_for(target.model.config)
    draft_source = resolve_draft(request.draft, target_adapter)
    derived = DerivedDraft.parse(draft_source) if draft_source and draft_source.startswith(DERIVED_PREFIX) else None
    draft = None
    if draft_source is not None and derived is None:
        with progress(f"loading draft {short_name(draft_source)}"):
            draft = load_source(draft_source, dtype)
        check_draft_compatible(target, draft)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = sibling(output, STAGING)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        target_entry = export_model("target", target, target_adapter, staging, dtype, request.opset, progress,
                                    accuracy_level=quant_accuracy(request, dtype), block_size=request.quant_block)
        draft_entry = None
        if draft is not None:
            draft_entry = export_model("draft", draft, adapter_for(draft.model.config), staging, dtype,
                                        request.opset, progress)
        elif derived is not None:
            draft_entry = _export_derived(derived, target, dtype, staging, request.opset, progress)
        ngram = _write_ngram(target, target_entry, request, staging, progress, bars)
        manifest = Manifest(
            name=output.name,
            dtype=dtype,
            target=target_entry,
            draft=draft_entry,
            tokenizer=_write_tokenizer(target, staging),
            specx_version=specx.__version__,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            ngram=ngram,
        )
        with_records(manifest, staging).write(staging)
        replace_bundle(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def check_draft_compatible(target: LoadedModel, draft: LoadedModel) -> None:
    """The checks llama.cpp makes before speculating: same vocabulary (size and strings), same special tokens."""
    t_size, d_size = target.model.config.vocab_size, draft.model.config.vocab_size
    if t_size != d_size:
        raise ExportError(f"draft {draft.source} has vocabulary size {d_size}, the target {t_size}; pick a draft "
                          "of the same model family")
    if target.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
        raise ExportError(f"draft {draft.source} tokenizes differently from the target (token strings differ)")
    for role in ("bos_token_id", "eos_token_id"):
        t, d = getattr(target.tokenizer, role), getattr(draft.tokenizer, role)
        if t != d:
            raise ExportError(f"draft {draft.source} has {role}={d}, the target {t}; the special tokens must match")


def quant_accuracy(request: ExportRequest, dtype: str) -> int:
    """The accuracy level asked, else by device: int8 compute (4) is the CPU kernels' fast path, whose multi-row
    passes are not exact; the CUDA formats take 0, so their trees measure exact on the CPU that exports them (the
    CUDA kernels have no such mode; scripts/gpu-check.sh checks their greedy equality)."""
    if request.quant_accuracy is not None:
        return request.quant_accuracy
    return EXACT_ACCURACY_LEVEL if PRECISIONS[dtype].device == CUDA else ACCURACY_LEVEL


def static_shapes(precision: Precision, adapter: ArchitectureAdapter) -> bool:
    """CUDA formats get static-shape graphs (a capacity-wide mask, the committed length as an input: what a CUDA
    graph replays), where GroupQueryAttention runs the head size; CPU formats keep the mask as wide as the pass."""
    return precision.device == CUDA and uses_gqa(adapter.spec)


def pads_passes(bits: int | None, accuracy_level: int, static: bool) -> bool:
    """Padded passes for a target whose weight-quantized matmuls compute in int8 on the CPU: they amplify the ~1e-7
    by which ONNX Runtime's one-row kernels (attention's M=1 GEMM; see ``pairs_rows``) differ from its multi-row ones
    to ~1 logit; with every pass padded, a chain pass gives each row what one-token steps give it, bit for bit
    (exact chains; measured at export: parity chains_exact). Where MatMulNBits computes every row alike (blocks up
    to ``pairs_rows``'s), the graph pads attention alone (``contract.padded_attention``: a one-token step costs what
    it did); elsewhere the runtime pads whole passes (``min_rows``, ``row_multiple``)."""
    return bool(bits) and accuracy_level >= INT8_COMPUTE_LEVEL and not static


def pairs_rows(bits: int | None, block_size: int) -> bool:
    """Whether MatMulNBits (int8 compute, ONNX Runtime 1.31's MLAS) computes rows in pairs, the odd last row with
    its one-row kernel, which differs: measured for int4 at blocks over 32 and int8 at blocks over 64."""
    return block_size > (PAIRED_INT4_BLOCK if bits == 4 else PAIRED_INT8_BLOCK)


def quantized_like(entry: ModelEntry) -> dict[str, int]:
    """export_model's accuracy_level and block_size for a graph quantized as ``entry`` (its defaults where it is
    not quantized): a target re-exported (train-draft's features, its teacher graph) matches the bundle's."""
    quantization = entry.quantization or {}
    return {"accuracy_level": quantization.get("accuracy_level", ACCURACY_LEVEL),
            "block_size": quantization.get("block_size", BLOCK_SIZE)}


def export_model(role: str, loaded: LoadedModel, adapter: ArchitectureAdapter, staging: Path, dtype: str,
                  opset: int, progress: Progress, source: str | None = None,
                  feature_layers: tuple[int, ...] = (), accuracy_level: int = ACCURACY_LEVEL,
                  block_size: int = BLOCK_SIZE, top_k: int | None = None) -> ModelEntry:
    """Build, validate (and for quantized dtypes quantize, at MatMulNBits ``accuracy_level``) one decoder graph into
    ``staging/<role>.onnx``. ``top_k``: the top tokens and probabilities it computes (None: a draft's DRAFT_TOP_K,
    none for a target)."""
    path = staging / f"{role}.onnx"
    top_k = (DRAFT_TOP_K if role == "draft" else 0) if top_k is None else top_k
    precision = PRECISIONS[dtype]
    kv_dtype, bits = precision.activations, precision.bits
    built = unquantized_path(path) if bits else path
    static = static_shapes(precision, adapter)
    padded = role == "target" and pads_passes(bits, accuracy_level, static)
    paired = padded and pairs_rows(bits, block_size)
    in_graph = padded and not paired and uses_gqa(adapter.spec)  # the graph pads attention alone: steps cost no more
    min_rows = EXACT_MIN_ROWS if padded and not in_graph else 1
    row_multiple = EXACT_ROW_MULTIPLE if paired else 1
    with progress(f"building the {role} graph for {short_name(source or loaded.source)}"):
        contract = export_decoder(adapter, loaded.model, built, kv_dtype, opset, head="own" if bits else "shared",
                                  feature_layers=feature_layers, top_k=top_k,
                                  static_shapes=static, min_rows=min_rows,
                                  row_multiple=row_multiple, padded_attention=in_graph)
    unmeasured = unmeasured_parity(dtype)
    if unmeasured is not None:  # bfloat16 without a GPU: written, checked on one later
        parity = unmeasured
    else:
        with progress(f"validating the {role} graph against PyTorch"):
            parity = validate_decoder(adapter, loaded.model, contract, built, precision.float_name).to_dict()
    if bits:
        with progress(f"quantizing the {role} graph to int{bits} (MatMulNBits)"):
            commit_path(built).rename(commit_path(path))
            quantize_built(path, bits, contract, accuracy_level, block_size)
        with progress(f"measuring the int{bits} {role} graph against PyTorch"):
            quantized = validate_decoder(adapter, loaded.model, contract, path, dtype, enforce=False).to_dict()
        parity = {**quantized, "unquantized_max_abs_logit_diff": parity["max_abs_logit_diff"]}
    return ModelEntry(
        role=role,
        source=source or loaded.source,
        graph=path.name,
        kv_commit=commit_path(path).name,
        architecture=adapter.spec,
        contract=contract,
        weight_bytes=weight_bytes(path),
        parity=parity,
        quantization=scheme(bits, precision.activations, accuracy_level, block_size) if bits else None,
    )


def _export_derived(derived: DerivedDraft, target: LoadedModel, dtype: str, staging: Path, opset: int,
                    progress: Progress) -> ModelEntry:
    """A draft made from the target: its first K layers and/or a weight-quantized copy (the same quantizer as
    int8/int4 targets)."""
    reference = target
    if derived.layers is not None:
        reference = LoadedModel(derived.spec, truncate_layers(target.model, derived.layers), target.tokenizer)
    try:
        draft_dtype = PRECISIONS[dtype].quantized(derived.bits).name if derived.bits is not None else dtype
    except ValueError as exc:
        raise ExportError(f"draft {derived.spec}: {exc}") from exc
    entry = export_model("draft", reference, adapter_for(reference.model.config), staging, draft_dtype, opset,
                          progress, source=derived.spec)
    return replace(entry, derived_from=derived.spec)


def _write_ngram(source: LoadedModel, target: ModelEntry, request: ExportRequest, staging: Path,
                 progress: Progress, bars: Bars | None = None) -> NgramEntry | None:
    """The Katz trigram table, from text the target writes itself (specx.exporter.ngram_build) and corpus files."""
    if request.ngram_tokens == 0 and not request.ngram_corpus:
        return None
    corpus = [Path(p) for p in request.ngram_corpus]
    args = (source.model, source.tokenizer, target.contract.vocab_size, request.ngram_tokens, corpus)
    if bars and request.ngram_tokens:  # a counted bar instead of a spinner (one live display at a time)
        bar = bars(f"{short_name(source.source)} writing text for the n-gram table (tokens)", request.ngram_tokens)
        try:
            model, info = build_ngram(*args, on_tokens=bar.update)
        finally:
            bar.close()
    else:
        with progress(f"building the n-gram table ({request.ngram_tokens} tokens of the target's text"
                      f"{', plus corpus files' if corpus else ''})"):
            model, info = build_ngram(*args)
    model.save(staging / NGRAM_FILE)
    return NgramEntry(file=NGRAM_FILE, info={**info, "sampled_from": source.source})


def _write_tokenizer(loaded: LoadedModel, staging: Path) -> TokenizerEntry:
    tok = loaded.tokenizer
    tok.backend_tokenizer.save(str(staging / TOKENIZER_FILE))
    generation = getattr(loaded.model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    if eos is None:
        eos = tok.eos_token_id
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
    special = {role: str(getattr(tok, role)) for role in ("bos_token", "eos_token", "pad_token", "unk_token")
               if getattr(tok, role, None) is not None}
    template = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
    return TokenizerEntry(
        file=TOKENIZER_FILE,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_ids=eos_ids,
        pad_token_id=tok.pad_token_id,
        special_tokens=special,
        chat_template=template,
    )


def with_records(manifest: Manifest, staging: Path) -> Manifest:
    """The manifest with the size and hashes of every file the bundle in ``staging`` holds."""
    return replace(manifest, files=record_files(staging, manifest))


def _check_output(output: Path) -> None:
    """Before any work: finish what an interrupted export left at ``output``, then refuse an output specx may not
    replace (checked again when the bundle moves in)."""
    recover(output)
    check_replaceable(output)
