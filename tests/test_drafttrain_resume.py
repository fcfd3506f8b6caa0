"""train-draft's phases resume and run data-parallel (issue 26): each phase writes shards with a manifest of what made
it; a run killed anywhere (a hook that SIGKILLs after shard or step k, and a SIGKILL from outside) continues to the
same draft as a run never stopped; a complete phase is skipped; a disk too small is refused before any work; two
processes under torchrun (gloo) write every shard once and train the draft one process trains (within DDP_ATOL); a
process that dies fails the job and a rerun resumes.

Every run here uses one torch thread: the same arithmetic in every process (torchrun gives each worker one), and no
OpenMP spin-waits on a busy 2-core machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from specx.drafttrain import workdir
from specx.drafttrain.pipeline import TrainDraftRequest, train_draft
from specx.drafttrain.workdir import CRASH_ENV, TRACE_ENV, DiskSpaceError
from specx.exporter.pipeline import ExportRequest, export_bundle
from specx.runtime.manifest import Manifest
from tests import tiny_models

# 8 texts of 160 tokens: 4 text shards, 4 label shards; 6 training texts, batches of 2: 3 steps an epoch, 12 steps
OPTIONS = dict(tokens=1200, draft_vocab=100, epochs=4, batch=2, shard_tokens=320, checkpoint_steps=2,
               precision="fp32", draft_bits=None)
CLI = ["--tokens", "1200", "--draft-vocab", "100", "--epochs", "4", "--batch", "2", "--shard-tokens", "320",
       "--checkpoint-steps", "2", "--precision", "fp32", "--draft-dtype", "fp32"]
DDP_ATOL = 1e-4  # |2-process draft - 1-process draft|, any weight (measured: 1.3e-6 after 12 steps, weights ~1.5)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    tiny_models.save_llama(root / "hf", tied=True)
    return export_bundle(ExportRequest(str(root / "hf"), draft="none", output=root / "bundle", dtype="fp32",
                                       ngram_tokens=0))


@pytest.fixture(scope="module")
def reference(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The work directory of a run never stopped."""
    root = tmp_path_factory.mktemp("reference")
    bundle = _copy(tiny_bundle, root / "bundle")
    train_draft(TrainDraftRequest(bundle, work_dir=root / "work", **OPTIONS), _step)
    return root / "work"


def _step(_: str):
    return contextlib.nullcontext()


def _copy(bundle: Path, to: Path) -> Path:
    shutil.copytree(bundle, to)
    return to


def _env(trace: Path, crash: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", TRACE_ENV: str(trace), "PYTHONPATH": str(ROOT)}
    env.pop(CRASH_ENV, None)
    return {**env, CRASH_ENV: crash} if crash else env


def _command(bundle: Path, work: Path, processes: int = 1) -> list[str]:
    launcher = ([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", str(processes)]
                if processes > 1 else [sys.executable])
    return [*launcher, "-m", "specx.drafttrain", str(bundle), *CLI, "--work-dir", str(work)]


def _run(bundle: Path, work: Path, trace: Path, crash: str | None = None,
         processes: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(_command(bundle, work, processes), env=_env(trace, crash), capture_output=True, text=True,
                          timeout=120)


def _trace(path: Path) -> list[tuple[str, int, int]]:
    lines = path.read_text().split() if path.exists() else []
    return [(lines[i], int(lines[i + 1]), int(lines[i + 2])) for i in range(0, len(lines), 3)]


def _assert_same_draft(work: Path, reference: Path, atol: float = 0.0) -> None:
    got, want = load_file(work / "train" / "draft.safetensors"), load_file(reference / "train" / "draft.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        if atol:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol, err_msg=name)
        else:
            assert np.array_equal(got[name], want[name]), name


def test_a_run_killed_in_the_data_phases_resumes_to_the_same_draft(tiny_bundle: Path, reference: Path,
                                                                   tmp_path: Path, monkeypatch):
    bundle, work, trace = _copy(tiny_bundle, tmp_path / "bundle"), tmp_path / "work", tmp_path / "trace"
    monkeypatch.setenv(TRACE_ENV, str(trace))  # the last run, in this process, traced too
    killed = _run(bundle, work, trace, crash="texts:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(p.name for p in (work / "texts").glob("shard-*")) == ["shard-00000", "shard-00001"]
    killed = _run(bundle, work, trace, crash="labels:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    train_draft(TrainDraftRequest(bundle, work_dir=work, **OPTIONS), _step)
    writes = [(phase, index) for phase, index, _ in _trace(trace) if phase in ("texts", "labels")]
    assert writes == [("texts", 0), ("texts", 1), ("texts", 2), ("texts", 3),  # each shard once, in order
                      ("labels", 0), ("labels", 1), ("labels", 2), ("labels", 3)]
    _assert_same_draft(work, reference)
    training = Manifest.read(bundle).draft.training
    assert training["resumed"] == ["texts", "labels"] and training["world_size"] == 1


def test_a_run_killed_while_training_resumes_to_the_same_draft(tiny_bundle: Path, reference: Path, tmp_path: Path,
                                                               monkeypatch):
    bundle, work, trace = _copy(tiny_bundle, tmp_path / "bundle"), tmp_path / "work", tmp_path / "trace"
    monkeypatch.setenv(TRACE_ENV, str(trace))
    killed = _run(bundle, work, trace, crash="step:5")  # after step 5: the checkpoint of step 4 is the last
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    process = subprocess.Popen(_command(bundle, work), env=_env(trace), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:  # a real SIGKILL from outside, as soon as the resumed run has saved a checkpoint (mid-step, or later)
        deadline = time.monotonic() + 60
        while ("checkpoint", 6, 0) not in _trace(trace) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    train_draft(TrainDraftRequest(bundle, work_dir=work, **OPTIONS), _step)
    checkpoints = [index for phase, index, _ in _trace(trace) if phase == "checkpoint"]
    assert checkpoints[:3] == [2, 4, 6] and 2 not in checkpoints[2:]  # the later runs resumed, never restarted
    assert sum(phase == "texts" for phase, _, _ in _trace(trace)) == 4  # the data was never written again
    _assert_same_draft(work, reference)
    assert "train" in Manifest.read(bundle).draft.training["resumed"]


def test_phases_record_what_made_them_and_are_skipped_when_complete(tiny_bundle: Path, reference: Path,
                                                                    tmp_path: Path, monkeypatch):
    texts = json.loads((reference / "texts" / "manifest.json").read_text())
    assert texts["complete"] and texts["shards"] == 4 and texts["dtype"] == "float32"
    assert texts["world_sizes"] == [1]
    assert {"target", "tokens", "seed", "recipe", "shard_tokens"} <= texts["identity"].keys()
    labels = json.loads((reference / "labels" / "manifest.json").read_text())
    assert labels["identity"]["texts"] == texts["identity"] and labels["shards"] == 4
    shard = reference / "labels" / "shard-00002"
    assert {p.name for p in shard.iterdir()} == {"tokens.npy", "lengths.npy", "features.npy", "top_ids.npy",
                                                  "top_probs.npy"}
    assert np.load(shard / "features.npy", allow_pickle=False).dtype == np.float16  # plain arrays, no pickle
    trace = tmp_path / "trace"
    monkeypatch.setenv(TRACE_ENV, str(trace))
    bundle = _copy(tiny_bundle, tmp_path / "bundle")
    phases: list[str] = []

    def step(name: str):
        phases.append(name)
        return contextlib.nullcontext()

    work = tmp_path / "work"
    shutil.copytree(reference, work)
    train_draft(TrainDraftRequest(bundle, work_dir=work, **OPTIONS), step)  # another bundle: the graphs alone
    assert not trace.exists() and any(p.startswith("reusing the training data") for p in phases)
    phases.clear()
    result = train_draft(TrainDraftRequest(bundle, work_dir=work, **OPTIONS), step)  # nothing left to do
    assert any(p.startswith("the bundle already holds this draft") for p in phases)
    assert result.training == Manifest.read(bundle).draft.training
    train_draft(TrainDraftRequest(bundle, work_dir=work, **{**OPTIONS, "epochs": 2}), _step)  # data reused
    assert {phase for phase, _, _ in _trace(trace)} == {"checkpoint", "train"}
    train_draft(TrainDraftRequest(bundle, work_dir=work, resume=False, **OPTIONS), _step)  # starts over
    assert sum(phase == "texts" for phase, _, _ in _trace(trace)) == 4
    _assert_same_draft(work, reference)


def test_a_disk_too_small_is_refused_before_any_work(tiny_bundle: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(workdir.shutil, "disk_usage", lambda _: SimpleNamespace(total=10**9, used=10**9, free=1000))
    with pytest.raises(DiskSpaceError, match=r"needs 2\.\d+ MB more \(464 bytes per token x 1,200 tokens .* has "
                                             r"0\.00 MB free"):
        train_draft(TrainDraftRequest(tiny_bundle, work_dir=tmp_path / "work", **OPTIONS), _step)
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["lock"]


def test_two_processes_train_the_same_draft_as_one(tiny_bundle: Path, reference: Path, tmp_path: Path):
    bundle, work, trace = _copy(tiny_bundle, tmp_path / "bundle"), tmp_path / "work", tmp_path / "trace"
    done = _run(bundle, work, trace, processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = [(phase, index, rank) for phase, index, rank in _trace(trace) if phase in ("texts", "labels")]
    assert sorted(shards) == [(phase, i, i % 2) for phase in ("labels", "texts") for i in range(4)]  # each once
    for phase in ("texts", "labels"):
        for index in range(4):
            name = f"{phase}/shard-{index:05d}/tokens.npy"
            assert (work / name).read_bytes() == (reference / name).read_bytes()  # the same data
    _assert_same_draft(work, reference, atol=DDP_ATOL)
    assert Manifest.read(bundle).draft.training["world_size"] == 2
    assert json.loads((work / "train" / "manifest.json").read_text())["world_sizes"] == [2]


def test_a_process_that_dies_fails_the_job_and_a_rerun_resumes(tiny_bundle: Path, reference: Path, tmp_path: Path):
    bundle, work, trace = _copy(tiny_bundle, tmp_path / "bundle"), tmp_path / "work", tmp_path / "trace"
    failed = _run(bundle, work, trace, crash="step:3@1", processes=2)  # process 1 dies after step 3
    assert failed.returncode != 0
    assert "rank      : 1" in failed.stderr and "SIGKILL" in failed.stderr, failed.stderr[-3000:]
    done = _run(bundle, work, trace, processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoints = [index for phase, index, _ in _trace(trace) if phase == "checkpoint"]
    assert checkpoints[:2] == [2, 4]  # resumed from step 2's checkpoint: its next one is step 4's
    assert sum(phase == "texts" for phase, _, _ in _trace(trace)) == 4
    _assert_same_draft(work, reference, atol=DDP_ATOL)


def test_the_cli_defaults_of_the_new_options_are_the_pipelines():
    import inspect

    from specx import cli

    options = inspect.signature(cli.train_draft_command).parameters
    for name in ("resume", "batch", "shard_tokens", "checkpoint_minutes", "checkpoint_steps", "precision",
                 "collective_timeout"):
        assert options[name].default.default == getattr(TrainDraftRequest, name), name


def test_a_failed_collective_says_what_happened_and_what_to_do():
    from specx.drafttrain.distributed import DistributedTrainingError, Ranks

    with pytest.raises(DistributedTrainingError, match=r"process 1 of 2: a training step failed \(\[pair.cc:553\] "
                                                       r"Connection closed by peer\); another process .* Run the same "
                                                       r"command again to resume"):
        with Ranks(1, 2, 1).collective("a training step"):
            raise RuntimeError("[pair.cc:553] Connection closed by peer\nmore detail")
    with pytest.raises(RuntimeError, match="not a collective"):  # a job of one: errors pass as they are
        with Ranks().collective("a training step"):
            raise RuntimeError("not a collective")


def test_the_phase_benchmark_measures_every_phase_and_projects_them(tiny_bundle: Path):
    from benchmarks import drafttrain_phases as bench

    measured = bench.measure(tiny_bundle, tokens=320, epochs=1.0, precision="fp32")
    assert all(measured["tokens_per_second"][phase] > 0 for phase in ("texts", "labels", "training"))
    rows = bench.projection(measured, utilisation=0.35, generation_utilisation=0.1)
    assert len(rows) == len(bench.TARGETS) * (1 + len(bench.GPUS) * len(bench.GPU_COUNTS))
    one, eight = (next(r for r in rows if r["target"] == "Llama-3.2-3B" and r["hardware"] == f"{n} x H100 SXM")
                  for n in (1, 8))
    assert one["total_minutes"] == pytest.approx(8 * eight["total_minutes"])
    # Llama-3.2-1B's draft (model.py's layout): 98.6M weights; labelling at 35% of 989 TFLOPS: 2 x 1.236e9 x 7e5 FLOPs
    assert bench.draft_params(2048, 32, 8, 64, 8192) == 98_566_144
    labels = next(r for r in rows if r["target"] == "Llama-3.2-1B" and r["hardware"] == "1 x H100 SXM")
    assert labels["minutes"]["labels"] == pytest.approx(2 * 1.236e9 * 7e5 / (0.35 * 989e12) / 60)
