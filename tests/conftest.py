from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub; set before huggingface_hub is imported
# bundles and train-draft's data cache go to a scratch home, never the user's ~/.cache/specx
os.environ["SPECX_HOME"] = __import__("tempfile").mkdtemp(prefix="specx-tests-home-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests import tiny_models  # noqa: E402

NGRAM_TOKENS = 2048  # a small n-gram table sampled from the draft: enough to exercise staged decoding


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf")


@pytest.fixture(scope="session")
def gpt2_dir(models_dir: Path) -> Path:
    return tiny_models.save_gpt2(models_dir / "tiny-gpt2", n_layer=3, seed=0)


@pytest.fixture(scope="session")
def gpt2_draft_dir(models_dir: Path) -> Path:
    return tiny_models.save_gpt2(models_dir / "tiny-gpt2-draft", n_layer=1, n_embd=32, n_head=2, seed=5)


@pytest.fixture(scope="session")
def llama_dir(models_dir: Path) -> Path:
    return tiny_models.save_llama(models_dir / "tiny-llama", tied=False)


@pytest.fixture(scope="session")
def llama_hd8_dir(models_dir: Path) -> Path:
    """Tied head, MHA, head_dim 8: the graph applies rotary in RotaryEmbedding nodes (the fused kernel needs 16k)."""
    return tiny_models.save_llama(models_dir / "tiny-llama-hd8", hidden=32, heads=4, kv_heads=4, tied=True, seed=4)


@pytest.fixture(scope="session")
def llama_hd8_bundle(tmp_path_factory: pytest.TempPathFactory, llama_hd8_dir: Path) -> Path:
    from specx.exporter.pipeline import ExportRequest, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-llama-hd8"
    return export_bundle(ExportRequest(str(llama_hd8_dir), draft="self:layers=1", output=out, dtype="fp32",
                                      ngram_tokens=0))


@pytest.fixture(scope="session")
def gpt2_bundle(tmp_path_factory: pytest.TempPathFactory, gpt2_dir: Path, gpt2_draft_dir: Path) -> Path:
    from specx.exporter.pipeline import ExportRequest, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-gpt2"
    return export_bundle(ExportRequest(str(gpt2_dir), draft=str(gpt2_draft_dir), output=out, dtype="fp32",
                                      ngram_tokens=NGRAM_TOKENS))


@pytest.fixture(scope="session")
def int4_bundle(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    """The default int4 target (MatMulNBits accuracy_level 4: int8 activations, padded passes) with a shallow draft
    that inherits the bundle's int4 quantization, and a small n-gram table."""
    from specx.exporter.pipeline import ExportRequest, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-llama-int4"
    return export_bundle(ExportRequest(str(llama_dir), draft="self:layers=1", output=out, dtype="int4",
                                       ngram_tokens=256))


@pytest.fixture(scope="session")
def llama_bundle(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    from specx.exporter.pipeline import ExportRequest, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-llama"
    return export_bundle(ExportRequest(str(llama_dir), draft="none", output=out, dtype="fp32", ngram_tokens=0))


@pytest.fixture(scope="session")
def gpt2_same_draft_bundle(tmp_path_factory: pytest.TempPathFactory, gpt2_dir: Path) -> Path:
    """The draft is the target itself: every greedy draft token is accepted."""
    from specx.exporter.pipeline import ExportRequest, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-gpt2-same"
    return export_bundle(ExportRequest(str(gpt2_dir), draft=str(gpt2_dir), output=out, dtype="fp32", ngram_tokens=0))


@pytest.fixture(scope="session")
def llama_self_bundle(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    """A draft derived from the target: its first layer, int8 weights."""
    from specx.exporter.pipeline import ExportRequest, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-llama-self"
    return export_bundle(ExportRequest(str(llama_dir), draft="self:layers=1,int8", output=out, dtype="fp32",
                                      ngram_tokens=NGRAM_TOKENS))


@pytest.fixture(scope="session")
def repeater_bundle(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    """A degenerate model that repeats itself (narrow init), its own draft, and a small n-gram table."""
    from specx.exporter.pipeline import ExportRequest, export_bundle

    src = tiny_models.save_gpt2(models_dir / "tiny-gpt2-repeater", n_layer=1, seed=2, init_range=0.02)
    out = tmp_path_factory.mktemp("bundles") / "tiny-repeater"
    return export_bundle(ExportRequest(str(src), draft=str(src), output=out, dtype="fp32", ngram_tokens=1024))
