"""`specx info`: what a bundle holds, checked as `specx run` checks it (and hashed in full with --verify)."""

from __future__ import annotations

from pathlib import Path

import typer

from specx.cli.common import app, tree_text, user_errors


@app.command()
def info(bundle: Path = typer.Argument(..., help="Bundle directory."),
         verify: bool = typer.Option(False, "--verify", help="Also hash every file in full against the manifest's "
                                                             "records (sha256, ~0.4 s per 500 MB).")) -> None:
    """Summarise a bundle: models, architecture, dtype, parity, sizes. Fails as `specx run` would on a bad bundle."""
    with user_errors():
        from specx.runtime.generator import Generator

        gen = Generator.load(bundle)  # every check run makes: files, graphs and their contracts, tables
        b = gen.bundle
        m = b.manifest
        typer.echo(f"bundle   {b.path}  (format {m.format_version}, specx {m.specx_version}, {m.created})")
        typer.echo(f"dtype    {m.dtype}")
        for entry in filter(None, (m.target, m.draft)):
            a = entry.architecture
            parity = entry.parity.get("max_abs_logit_diff", entry.parity.get("max_abs_diff"))
            parity_text = "n/a" if parity is None else f"{parity:.2e}"
            if "unquantized_max_abs_logit_diff" in entry.parity:  # quantization error, measured, not a defect
                parity_text += f" (before quantization {entry.parity['unquantized_max_abs_logit_diff']:.2e})"
            derived = f" (derived: {entry.derived_from})" if entry.derived_from else ""
            q = entry.quantization
            quant = (f"  quantized int{q['bits']} {q['method']} block {q['block_size']} accuracy_level "
                     f"{q['accuracy_level']}{', lm_head too' if q.get('lm_head') else ''}") if q else ""
            typer.echo(
                f"{entry.role:<8} {entry.source}{derived}  [{a.model_type}, {a.num_layers} layers, hidden "
                f"{a.hidden_size}, {a.num_heads} heads / {a.num_kv_heads} kv, vocab {a.vocab_size}, context "
                f"{a.max_positions}, {a.position_encoding} positions]  weights {entry.weight_bytes / 2**20:.1f} MiB"
                f"  max |logit diff| vs torch {parity_text}{quant}"
            )
        steps = m.target.parity.get("tree_vs_steps")
        measured = "" if steps is None else f" (tree pass vs one-token steps: {steps:.1e})"
        kind = gen.draft_kind
        chains = m.target.parity.get("chain_vs_steps")
        chain_text = "" if chains is None else f" (chain pass vs one-token steps: {chains:.1e})"
        if kind.exact_trees:
            typer.echo(f"trees    exact{measured}: every mode keeps plain decoding's output")
        elif kind.exact_chains:
            typer.echo(f"trees    chains only{chain_text}; trees not exact{measured}: every mode verifies chains "
                       "(export with --quant-accuracy 0 for exact trees)")
        else:
            typer.echo(f"trees    not exact{measured}: decodes plainly (export with --quant-accuracy 0 to speculate)")
        if m.draft is None:
            typer.echo("draft    none")
        elif m.draft.training:
            t = m.draft.training
            agree = ", ".join(f"{a:.0%}" for a in t.get("held_out_agreement", []))
            typer.echo(f"training feature draft ({t.get('draft_layers', 1)} layer(s) over target layers "
                       f"{t.get('feature_layers')}, vocabulary {t.get('draft_vocab')}): "
                       f"{t.get('train_tokens', 0):,} tokens, seed {t.get('seed')}, held-out agreement {agree}, "
                       f"tau {t.get('held_out_tau', 0):.2f}, {t.get('train_seconds', 0) / 60:.1f} min training")
        if m.ngram is None:
            typer.echo("ngram    none")
        else:
            info = m.ngram.info
            typer.echo(f"ngram    {m.ngram.file}  ({info.get('total_tokens', '?')} tokens: "
                       f"{info.get('sampled_tokens', 0)} {'written' if info.get('text') else 'sampled'} by "
                       f"{info.get('sampled_from', '?')}, "
                       f"{len(info.get('corpus_files', []))} corpus files)")
        for key, tuned in (m.tuning or {}).items():
            typer.echo(f"tuned    {key}: {tuned.get('mode')}{tree_text(tuned)}: {tuned.get('speedup')}x plain "
                       f"decoding on {tuned.get('machine')} ({tuned.get('provider')}, {tuned.get('measured')})")
        t = m.tokenizer
        typer.echo(f"tokenizer {t.file}  vocab {t.vocab_size}, bos {t.bos_token_id}, eos {list(t.eos_token_ids)}")
        _info_files(b.path, m, verify)


def _info_files(path: Path, manifest, verify: bool) -> None:  # noqa: ANN001  (a Manifest: the runtime loads lazily)
    from specx.runtime.integrity import verify_files

    if manifest.files is None:
        typer.echo("files    not recorded (exported before specx recorded them; re-export to record them)")
    else:
        size = sum(r.size for r in manifest.files.values())
        typer.echo(f"files    {len(manifest.files)} recorded, {size / 2**20:.1f} MiB: sizes and spot digests checked "
                   f"at every load{'' if verify else '; --verify hashes them in full'}")
    if verify:
        done = verify_files(path, manifest)
        typer.echo(f"verified {done.files} files, {done.bytes / 2**20:.1f} MiB: sha256 as exported "
                   f"({done.seconds:.2f} s)")
