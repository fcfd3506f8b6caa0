"""Shared test helpers: open a bundle's target on the CPU through the runtime's own IO-binding path."""

from __future__ import annotations

from pathlib import Path

from specx.runtime.bundle import Bundle
from specx.runtime.generator import _decoder
from specx.runtime.session import DecoderSession


def open_target(bundle_dir: Path, batch: int = 1) -> DecoderSession:
    bundle = Bundle.load(bundle_dir)
    session = _decoder(bundle, bundle.manifest.target, "cpu")
    if batch != 1:
        session = DecoderSession(session._decoder, session._gather_session, session.contract, session.placement, batch=batch)
    return session


def open_draft(bundle_dir: Path) -> DecoderSession:
    bundle = Bundle.load(bundle_dir)
    return _decoder(bundle, bundle.manifest.draft, "cpu")
