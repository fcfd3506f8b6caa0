"""Commands that build a bundle: `specx export` and `specx train-draft` (both need the export extra; they report
progress as live bars on a terminal and as plain lines in a log)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from specx.cli.common import DType, app, needs_extra, user_errors
from specx.errors import SpecxError
from specx.progress import terminal_progress
from specx.runtime.ngram import DEFAULT_SAMPLE_TOKENS

DRAFT_BITS = {"fp32": None, "int8": 8, "int4": 4}  # --draft-dtype -> weight bits (None: unquantized)


@app.command()
def export(
    source: str = typer.Argument(..., help="Hugging Face hub id (gpt2-large), local model directory, or .gguf file."),
    draft: Optional[str] = typer.Option(None, help="Draft model source, or 'none'. Default: the family's draft "
                                                   "(gpt2 -> distilgpt2); required for other families."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Bundle directory. Default: $SPECX_HOME/<name>."),
    dtype: DType = typer.Option(DType.auto, help="Graph precision: fp16 for CUDA, fp32 for CPU (auto picks); int8 / "
                                                 "int4: weight-only quantized (MatMulNBits, lm_head included) with "
                                                 "fp32 activations, for CPU; fp16-int8 / fp16-int4: the same with "
                                                 "fp16 activations, for CUDA; bf16: bfloat16 (range of fp32: for "
                                                 "models whose activations overflow fp16), CUDA only (sm80+)."),
    opset: int = typer.Option(18, help="ONNX opset (18 or newer)."),
    ngram_tokens: int = typer.Option(DEFAULT_SAMPLE_TOKENS, help="Tokens of text the target writes itself (train-draft's "
                                                  "recipe) for a static n-gram table; default 0: staged and ngram "
                                                  "modes count the prompt and output only (as fast, measured)."),
    ngram_corpus: Optional[list[Path]] = typer.Option(None, help="Text file(s) to add to the n-gram table."),
    quant_accuracy: Optional[int] = typer.Option(None, help="MatMulNBits accuracy level of an int8/int4 target (default: 4 "
                                                "for int8/int4, 0 for fp16-int8/fp16-int4): 4 (int8 compute, "
                                               "fastest steps; exact chains: no attention call of one row, and the "
                                               "bundle speculates with chains only) or 0 (float compute: exact "
                                               "trees too, ~1.3x slower steps on SmolLM2-135M)."),
    quant_block: int = typer.Option(32, help="MatMulNBits block size of an int8/int4 target (16, 32, 64, 128 or "
                                             "256): larger blocks store fewer scales and step faster, less exactly."),
) -> None:
    """Export a target model (and its draft) into one bundle: graphs, tokenizer, manifest."""
    with user_errors():
        with needs_extra("export", "export"):
            from specx.exporter.pipeline import ExportRequest, export_bundle
        progress = terminal_progress()
        request = ExportRequest(source, draft, output, dtype.value, opset, ngram_tokens, tuple(ngram_corpus or ()),
                                quant_accuracy, quant_block)
        path = export_bundle(request, progress.phase, progress.bar)
        typer.echo(str(path))


@app.command("train-draft")  # also `python -m specx.drafttrain` (torchrun, accelerate launch)
def train_draft_command(
    model: str = typer.Argument(..., help="Bundle directory, or a name under $SPECX_HOME."),
    tokens: Optional[int] = typer.Option(None, help="Tokens of training text the target writes itself. Default: "
                                                    "700,000 when torch trains on a GPU, 250,000 on a CPU (the "
                                                    "whole run within the hour for SmolLM2-135M on 2 cores)."),
    corpus: Optional[list[Path]] = typer.Option(None, help="Text file(s) to train on as well (teacher-forced)."),
    draft_vocab: int = typer.Option(8192, help="Draft vocabulary: the target's most used tokens."),
    epochs: float = typer.Option(8.0, help="Passes over the training text."),
    draft_layers: int = typer.Option(1, help="Decoder layers in the draft (each adds about a layer's cost to a "
                                             "draft call)."),
    hard_label: float = typer.Option(0.0, help="Share of each position's label moved onto the target's top token "
                                               "(0: the target's distribution alone; 1: its top token alone)."),
    device: str = typer.Option("auto", help="Where torch trains: auto, cpu or cuda."),
    seed: int = typer.Option(0, help="Seed for data and initialisation."),
    draft_dtype: str = typer.Option("int8", help="Draft graph weights: int8 or int4 weight-only quantized "
                                                 "(MatMulNBits, as --dtype int8|int4 of export), or fp32 (not "
                                                 "quantized). Activations and cache follow the target: float16 "
                                                 "on fp16* bundles. int8 measured half the draft's cost of fp32 "
                                                 "at the same tau."),
    cache: bool = typer.Option(True, help="Keep the work directory after success, so that training again (other "
                                          "--epochs, --draft-vocab or a smaller --tokens) skips writing the data."),
    work_dir: Optional[Path] = typer.Option(None, help="Where the phases keep their shards, manifests and "
                                                      "checkpoints. Default: $SPECX_HOME/train-work/NAME-DIGEST."),
    resume: bool = typer.Option(True, help="Continue what an earlier run left in the work directory (a phase whose "
                                           "output is complete is skipped); --no-resume starts over."),
    batch: int = typer.Option(8, help="Texts per optimizer step, over all processes of a job."),
    shard_tokens: int = typer.Option(32768, help="Tokens per data shard: the unit a killed run resumes from and "
                                                 "processes of a job share out."),
    checkpoint_minutes: float = typer.Option(10.0, help="Save the training state this often (minutes)."),
    checkpoint_steps: int = typer.Option(0, help="Also save it every this many steps (0: by time alone)."),
    precision: str = typer.Option("auto", help="auto, fp32 or bf16: the target copy that writes and labels the text, "
                                               "and the draft's autocast (auto: bf16 where it measures faster)."),
    teacher: str = typer.Option("source", help="Who writes and labels the text: source (the PyTorch source model, "
                                               "batched) or graph (the bundle's own target graph at its dtype: "
                                               "the text, features and distributions of the model the draft will "
                                               "run beside; on an int4 SmolLM2 it measured no higher tau)."),
    collective_timeout: float = typer.Option(1800.0, help="Under torchrun: seconds a process waits for the others "
                                                          "before the job fails."),
) -> None:
    """Train a feature draft for the bundle's target (self-distillation, offline) and put it in the bundle."""
    with user_errors():
        with needs_extra("train-draft", "export"):
            from specx.drafttrain.pipeline import TrainDraftRequest, train_draft, training_summary
        from specx.runtime.bundle import resolve_bundle_dir

        if draft_dtype not in DRAFT_BITS:
            raise SpecxError(f"unknown --draft-dtype {draft_dtype!r}; use fp32, int8 or int4")
        progress = terminal_progress()
        request = TrainDraftRequest(resolve_bundle_dir(model), tokens, tuple(corpus or ()), draft_vocab, device, seed,
                                    epochs, cache_data=cache, draft_bits=DRAFT_BITS[draft_dtype],
                                    draft_layers=draft_layers, hard_label=hard_label, work_dir=work_dir,
                                    resume=resume, batch=batch, shard_tokens=shard_tokens,
                                    checkpoint_minutes=checkpoint_minutes, checkpoint_steps=checkpoint_steps,
                                    precision=precision, teacher=teacher, collective_timeout=collective_timeout)
        result = train_draft(request, progress.phase, progress.bar)
        if result.training:  # the process that wrote the bundle (the main one of a torchrun job)
            minutes = result.training.get("total_seconds", 0) / 60
            typer.echo(f"{result.bundle}: {training_summary(result.training)}; {minutes:.1f} minutes")
