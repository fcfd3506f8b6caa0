"""Bundles and the files around them: export replaces only specx's own bundles, an interrupted replacement is
completed or undone, manifest paths stay inside the bundle, files are checked against what export recorded, and a
bad tuning record or context is one error line (issue 25, "nothing breaks it")."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from specx.cli import app
from specx.errors import BundleError, InvalidArgumentError
from specx.exporter.pipeline import ExportRequest, export_bundle
from specx.runtime.bundle import POSITION_TABLES, Bundle
from specx.runtime.integrity import SPOT_BLOCK_BYTES, _spot_offsets, verify_files
from specx.runtime.manifest import MANIFEST_FILE, Manifest
from specx.runtime.onnx_proto import initializers
from specx.runtime.swap import recover

runner = CliRunner()


def _copy(bundle: Path, dst: Path) -> Path:
    shutil.copytree(bundle, dst)
    return dst


def _edit_manifest(bundle: Path, edit) -> None:  # noqa: ANN001
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    edit(manifest)
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))


def _one_error(args: list[str], match: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in result.output, result.output
    return lines[0]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _hidden_siblings(output: Path) -> list[str]:
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))


# -- export replaces only specx's bundles -------------------------------------------------------------------------
def test_export_refuses_a_folder_whose_manifest_is_not_specx(tmp_path: Path, llama_dir: Path):
    app_dir = tmp_path / "webapp"
    app_dir.mkdir()
    (app_dir / MANIFEST_FILE).write_text(json.dumps({"name": "My App", "short_name": "app", "icons": []}))
    (app_dir / "index.html").write_text("<html></html>")
    with pytest.raises(InvalidArgumentError, match="not a specx bundle"):
        export_bundle(ExportRequest(str(llama_dir), draft="none", output=app_dir, dtype="fp32", ngram_tokens=0))
    assert sorted(p.name for p in app_dir.iterdir()) == ["index.html", MANIFEST_FILE]
    _one_error(["export", str(llama_dir), "--draft", "none", "--output", str(app_dir)], "not a specx bundle")
    assert (app_dir / "index.html").read_text() == "<html></html>"


def test_a_manifest_of_another_format_is_not_a_bundle(llama_bundle: Path, tmp_path: Path):
    bundle = _copy(llama_bundle, tmp_path / "b")
    _edit_manifest(bundle, lambda m: m.update(format="something-else"))
    with pytest.raises(BundleError, match="not a specx bundle"):
        Manifest.read(bundle)
    (bundle / "notes.txt").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="not a specx bundle"):
        export_bundle(ExportRequest("unused", draft="none", output=bundle, dtype="fp32", ngram_tokens=0))


def test_export_refuses_a_bundle_that_holds_files_it_did_not_write(llama_bundle: Path, tmp_path: Path,
                                                                   llama_dir: Path):
    bundle = _copy(llama_bundle, tmp_path / "b")
    (bundle / "notes.txt").write_text("mine")
    (bundle / "plots").mkdir()
    with pytest.raises(InvalidArgumentError, match="notes.txt, plots"):
        export_bundle(ExportRequest(str(llama_dir), draft="none", output=bundle, dtype="fp32", ngram_tokens=0))
    assert (bundle / "notes.txt").read_text() == "mine" and (bundle / "plots").is_dir()


def test_export_replaces_a_bundle_written_before_the_format_marker(llama_bundle: Path, tmp_path: Path,
                                                                   llama_dir: Path):
    """A version-2 bundle from before the marker and the file records is still specx's: replaced, and stale
    staging folders of dead exports beside it are removed (a live export's are kept)."""
    bundle = _copy(llama_bundle, tmp_path / "b")
    _edit_manifest(bundle, lambda m: [m.pop(key, None) for key in ("format", "files")])
    assert Bundle.load(bundle).manifest.files is None  # still loads
    stale = tmp_path / f".b.partial-{_dead_pid()}"
    stale.mkdir()
    (stale / "target.onnx").write_bytes(b"half")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f".b.partial-{live.pid}"
        running.mkdir()
        export_bundle(ExportRequest(str(llama_dir), draft="none", output=bundle, dtype="fp32", ngram_tokens=0))
        assert _hidden_siblings(bundle) == [running.name]
    finally:
        live.kill()
        live.wait()
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    assert manifest["format"] == "specx-bundle" and manifest["files"]


# -- an interrupted replacement is completed or undone -----------------------------------------------------------
KILLED_SWAP = """
import os, shutil, signal, sys
from pathlib import Path
from specx.runtime.swap import replace_bundle  # the function export and train-draft call

new, output = Path(sys.argv[1]), Path(sys.argv[2])
staging = output.parent / f".{output.name}.partial-{os.getpid()}"
shutil.copytree(new, staging)
rename = os.rename

def rename_then_die(src, dst, *args, **kwargs):
    rename(src, dst, *args, **kwargs)
    if os.fspath(src) == os.fspath(output):  # the old bundle has just moved aside
        os.kill(os.getpid(), signal.SIGKILL)

os.rename = rename_then_die
replace_bundle(staging, output)
"""


def test_a_replacement_killed_between_its_renames_is_completed_by_the_next_load(llama_bundle: Path, tmp_path: Path):
    output = _copy(llama_bundle, tmp_path / "b")
    new = _copy(llama_bundle, tmp_path / "new")
    _edit_manifest(new, lambda m: m.update(created="the new one"))
    killed = subprocess.run([sys.executable, "-c", KILLED_SWAP, str(new), str(output)], cwd=Path(__file__).parents[1])
    assert killed.returncode == -9, killed
    assert Bundle.load(output).manifest.created == "the new one"
    assert _hidden_siblings(output) == []


def test_an_old_bundle_moved_aside_by_a_dead_export_is_put_back(llama_bundle: Path, tmp_path: Path):
    output = tmp_path / "b"
    _copy(llama_bundle, tmp_path / f".b.old-{_dead_pid()}")
    partial = tmp_path / f".b.partial-{_dead_pid()}"  # an unfinished new bundle: never moved in
    partial.mkdir()
    runner.invoke(app, ["info", str(output)])  # a load (here through the CLI) recovers
    assert Bundle.load(output).manifest.name == Bundle.load(llama_bundle).manifest.name
    assert _hidden_siblings(output) == []


def test_recovery_leaves_a_running_export_alone(llama_bundle: Path, tmp_path: Path):
    output = tmp_path / "b"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ready = _copy(llama_bundle, tmp_path / f".b.ready-{live.pid}")
        recover(output)
        assert ready.is_dir() and not output.exists()
    finally:
        live.kill()
        live.wait()


# -- manifest paths stay inside the bundle -------------------------------------------------------------------------
def _outside(bundle: Path, tmp_path: Path, name: str) -> Path:
    """A copy of one of the bundle's files outside it (with a graph's data beside it): what an escaping path opens."""
    outside = tmp_path / "elsewhere"
    outside.mkdir(exist_ok=True)
    for file in bundle.glob(f"{name}*"):
        shutil.copy(file, outside / file.name)
    return outside / name


@pytest.mark.parametrize("field", ["graph", "kv_commit", "tokenizer", "ngram", "vocab_map"])
@pytest.mark.parametrize("absolute", [True, False])
def test_manifest_paths_outside_the_bundle_are_refused(llama_bundle: Path, tmp_path: Path, field: str,
                                                       absolute: bool):
    bundle = _copy(llama_bundle, tmp_path / "b")
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    name = {"graph": manifest["target"]["graph"], "kv_commit": manifest["target"]["kv_commit"],
            "tokenizer": manifest["tokenizer"]["file"], "ngram": "ngram.npz", "vocab_map": "draft_vocab.npy"}[field]
    target = _outside(bundle, tmp_path, name)
    path = str(target) if absolute else f"../elsewhere/{name}"

    def edit(m: dict) -> None:
        if field in ("graph", "kv_commit", "vocab_map"):
            m["target"][field] = path
        elif field == "tokenizer":
            m["tokenizer"]["file"] = path
        else:
            m["ngram"] = {"file": path, "info": {}}

    _edit_manifest(bundle, edit)
    with pytest.raises(BundleError, match="outside the bundle"):
        Bundle.load(bundle)


def test_a_symlink_out_of_the_bundle_is_refused(llama_bundle: Path, tmp_path: Path):
    bundle = _copy(llama_bundle, tmp_path / "b")
    target = _outside(bundle, tmp_path, "target.onnx.data")
    (bundle / "target.onnx.data").unlink()
    (bundle / "target.onnx.data").symlink_to(target)
    with pytest.raises(BundleError, match="outside the bundle"):
        Bundle.load(bundle)


# -- every file recorded at export, checked at load -------------------------------------------------------------
def test_export_records_every_file(llama_bundle: Path):
    records = json.loads((llama_bundle / MANIFEST_FILE).read_text())["files"]
    on_disk = {p.name for p in llama_bundle.iterdir()} - {MANIFEST_FILE}
    assert set(records) == on_disk and "target.onnx.data" in records
    for name, record in records.items():
        data = (llama_bundle / name).read_bytes()
        assert record["size"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()


def test_random_bytes_in_the_weights_are_refused_by_run_and_info(llama_bundle: Path, tmp_path: Path):
    bundle = _copy(llama_bundle, tmp_path / "b")
    data = bundle / "target.onnx.data"
    data.write_bytes(np.random.default_rng(0).bytes(data.stat().st_size))  # same size: only the content differs
    with pytest.raises(BundleError, match="target.onnx.data differs"):
        Bundle.load(bundle)
    _one_error(["run", "--model", str(bundle), "--prompt", "one", "--provider", "cpu"], "target.onnx.data")
    _one_error(["info", str(bundle)], "target.onnx.data")


def test_a_truncated_or_missing_file_is_refused(llama_bundle: Path, tmp_path: Path):
    bundle = _copy(llama_bundle, tmp_path / "b")
    data = bundle / "target.onnx.data"
    data.write_bytes(data.read_bytes()[:-4])
    _one_error(["info", str(bundle)], "the manifest recorded")
    data.unlink()
    _one_error(["info", str(bundle)], "target.onnx.data is missing")


def test_info_verify_hashes_every_file_in_full(llama_bundle: Path, tmp_path: Path):
    bundle = _copy(llama_bundle, tmp_path / "b")
    result = runner.invoke(app, ["info", str(bundle), "--verify"])
    assert result.exit_code == 0 and "verified" in result.output, result.output
    data = bundle / "target.onnx.data"
    content = bytearray(data.read_bytes())
    spots = {o + i for o in _spot_offsets(len(content)) for i in range(SPOT_BLOCK_BYTES)}
    changed = next(i for i in range(len(content) // 2, len(content)) if i not in spots)
    content[changed] ^= 0xFF
    data.write_bytes(bytes(content))
    Bundle.load(bundle)  # one byte between the spot blocks: only the full hash sees it
    _one_error(["info", str(bundle), "--verify"], "sha256 mismatch")


def test_a_bundle_without_records_loads_but_cannot_be_verified(llama_bundle: Path, tmp_path: Path):
    bundle = _copy(llama_bundle, tmp_path / "b")
    _edit_manifest(bundle, lambda m: m.pop("files", None))
    out = runner.invoke(app, ["info", str(bundle)])
    assert out.exit_code == 0 and "not recorded" in out.output, out.output
    _one_error(["info", str(bundle), "--verify"], "re-export")
    with pytest.raises(BundleError, match="records no file hashes"):
        verify_files(bundle, Bundle.load(bundle).manifest)


def test_a_named_file_missing_from_the_records_is_refused(llama_bundle: Path, tmp_path: Path):
    bundle = _copy(llama_bundle, tmp_path / "b")
    shutil.copy(bundle / "tokenizer.json", bundle / "other.json")
    _edit_manifest(bundle, lambda m: m["tokenizer"].update(file="other.json"))
    with pytest.raises(BundleError, match="other.json is named but not among"):
        Bundle.load(bundle)


def test_info_refuses_a_bundle_run_refuses(llama_bundle: Path, tmp_path: Path):
    """A graph whose I/O contradicts the manifest: run refuses it when it opens the sessions; info must too."""
    bundle = _copy(llama_bundle, tmp_path / "b")

    def edit(m: dict) -> None:
        m["target"]["contract"]["num_kv_heads"] += 1
        m["target"]["contract"]["inputs"][3]["shape"][1] += 1

    _edit_manifest(bundle, edit)
    _one_error(["run", "--model", str(bundle), "--prompt", "one", "--provider", "cpu"], "contract")
    _one_error(["info", str(bundle)], "contract")


# -- one error line, not a traceback --------------------------------------------------------------------------------
@pytest.mark.parametrize("tuning", [
    "fast",
    {"greedy": [1, 2]},
    {"fastest": {"mode": "speculative"}},
    {"greedy": {"mode": "warp"}},
    {"greedy": {"mode": "ngram", "tree_budget": "8", "tree_depth": 4}},
    {"greedy": {"mode": "ngram", "tree_budget": 2, "tree_depth": 4}},
    {"greedy": {"mode": "ngram", "tree_budget": 4, "tree_depth": 4, "tree_floor": "low"}},
    {"greedy": {"mode": "ngram", "tree_budget": 4, "tree_depth": 4, "tree_threshold": 2}},
    {"sampling": {"mode": "autoregressive", "draft_choice": 3}},
])
def test_a_malformed_tuning_record_is_one_error_line(llama_bundle: Path, tmp_path: Path, tuning):  # noqa: ANN001
    bundle = _copy(llama_bundle, tmp_path / "b")
    _edit_manifest(bundle, lambda m: m.update(tuning=tuning))
    _one_error(["run", "--model", str(bundle), "--prompt", "one", "--max-new-tokens", "2"], "tuning")
    _one_error(["info", str(bundle)], "tuning")


def test_a_well_formed_tuning_record_is_used(llama_bundle: Path, tmp_path: Path):
    bundle = _copy(llama_bundle, tmp_path / "b")
    tuned = {"mode": "ngram", "tree_budget": 3, "tree_depth": 3, "tree_threshold": None, "tree_floor": 0.0,
             "draft_choice": "sample", "speedup": 1.1}
    _edit_manifest(bundle, lambda m: m.update(tuning={"greedy": tuned}))
    out = json.loads(runner.invoke(app, ["run", "--model", str(bundle), "--prompt", "one", "--max-new-tokens", "2",
                                         "--json"]).stdout)
    assert out["stats"]["mode"] == "ngram" and out["stats"]["tree_budget"] == 3


@pytest.mark.parametrize("fixture", ["llama_bundle", "gpt2_bundle"])
def test_a_context_beyond_the_graphs_position_tables_is_refused(fixture: str, request: pytest.FixtureRequest,
                                                                tmp_path: Path):
    source = request.getfixturevalue(fixture)
    manifest = Bundle.load(source).manifest
    for entry in filter(None, (manifest.target, manifest.draft)):  # the check finds the tables it compares with
        tables = {k: v.dims for k, v in initializers(source / entry.graph).items() if k in POSITION_TABLES}
        assert tables and all(dims[0] == entry.architecture.max_positions for dims in tables.values()), tables
    bundle = _copy(source, tmp_path / "b")
    _edit_manifest(bundle, lambda m: m["target"]["architecture"].update(max_positions=100_000))
    with pytest.raises(BundleError, match="position tables"):
        Bundle.load(bundle)
    _one_error(["run", "--model", str(bundle), "--prompt", "one", "--max-new-tokens", "2"], "position tables")
    _one_error(["info", str(bundle)], "position tables")


def test_the_position_tables_of_split_rotary_and_quantized_graphs_are_found(llama_hd8_bundle: Path,
                                                                            llama_self_bundle: Path):
    for bundle in (llama_hd8_bundle, llama_self_bundle):
        manifest = Bundle.load(bundle).manifest
        for entry in (manifest.target, manifest.draft):
            rows = {v.dims[0] for k, v in initializers(bundle / entry.graph).items() if k in POSITION_TABLES}
            assert rows == {entry.architecture.max_positions}, (bundle, entry.role)


def test_the_graph_reader_agrees_with_onnx(llama_self_bundle: Path):
    onnx = pytest.importorskip("onnx")
    for name in ("target.onnx", "draft.onnx", "target.kv_commit.onnx"):
        model = onnx.load(str(llama_self_bundle / name), load_external_data=False)
        expected = {t.name: (tuple(t.dims), next((e.value for e in t.external_data if e.key == "location"), None))
                    for t in model.graph.initializer}
        got = {k: (v.dims, v.location) for k, v in initializers(llama_self_bundle / name).items()}
        assert got == expected


def test_a_graph_that_is_not_onnx_is_a_bundle_error(tmp_path: Path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"\xff" * 20)
    with pytest.raises(BundleError, match="not a valid ONNX graph"):
        initializers(bad)
    os.truncate(bad, 0)
    with pytest.raises(BundleError, match="not a valid ONNX graph"):
        initializers(bad)
