"""`specx bench --against onnxruntime-genai` without onnxruntime-genai: the worker protocol (the real worker script
over a fake onnxruntime_genai module), precision mapping, the build cache and its key, and the skip note."""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from specx import peers_genai as g
from specx.graphs.precision import DTYPES
from specx.peer_workers import GENAI_WORKER, genai_worker
from specx.peers import Peer, load_peers

# A stand-in for onnxruntime_genai: token k+1 follows token k (greedy), offset by the seed when sampling; the
# thread count of the config overlay becomes the reported version, so the test sees that it arrived.
FAKE_GENAI = textwrap.dedent('''
    import json
    __version__ = "unset"

    class Config:
        def __init__(self, path):
            self.path = path
        def overlay(self, text):
            global __version__
            threads = json.loads(text)["model"]["decoder"]["session_options"]["intra_op_num_threads"]
            __version__ = f"fake-{threads}-threads"

    class Model:
        def __init__(self, config):
            if config.path.endswith("broken"):
                raise RuntimeError("cannot load " + config.path)

    class GeneratorParams:
        def __init__(self, model):
            self.options = {}
        def set_search_options(self, **options):
            self.options.update(options)

    class Generator:
        def __init__(self, model, params):
            self.options = params.options
            self.sequence = []
        def append_tokens(self, ids):
            self.sequence += list(ids)
        def is_done(self):
            return len(self.sequence) >= self.options["max_length"]
        def generate_next_token(self):
            if self.sequence[-1] == 666:
                raise RuntimeError("token 666")
            step = self.options["random_seed"] if self.options["do_sample"] else 0
            self.sequence.append(self.sequence[-1] + 1 + step)
        def get_sequence(self, index):
            return list(self.sequence)
''')


@pytest.fixture()
def fake_genai(tmp_path: Path) -> list[str]:
    """The command prefix that runs a script with the fake onnxruntime_genai importable."""
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "onnxruntime_genai.py").write_text(FAKE_GENAI)
    launcher = tmp_path / "launch.py"
    launcher.write_text(textwrap.dedent(f'''
        import runpy, sys
        sys.path.insert(0, {str(tmp_path / "fake")!r})
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
    '''))
    return [sys.executable, str(launcher)]


def _worker(prefix: list[str], tmp_path: Path, model: str = "model", threads: int = 2) -> g.Worker:
    return g.Worker([*prefix, str(GENAI_WORKER), model, "--threads", str(threads)], tmp_path / "logs" / "worker.log")


# --- the worker and its protocol ------------------------------------------------------------------------------

def test_worker_protocol_greedy_and_sampled(fake_genai, tmp_path):
    worker = _worker(fake_genai, tmp_path, threads=3)
    try:
        assert worker.version == "fake-3-threads"  # the thread overlay reached genai's config
        tokens, seconds = worker.generate([5, 6, 7], 4, 0.0, 0)
        assert tokens == [8, 9, 10, 11] and 0 <= seconds < 5
        tokens, _ = worker.generate([5], 3, 1.0, 10)  # sampled: the fake steps by the seed
        assert tokens == [16, 27, 38]
        with pytest.raises(g.WorkerError, match="token 666"):  # a generation failure: one error reply
            worker.generate([666], 2, 0.0, 0)
        assert worker.generate([1], 1, 0.0, 0)[0] == [2]  # and the worker still serves
    finally:
        worker.close()
    assert worker.process.poll() == 0  # end of input ends it


def test_peer_uses_the_seconds_the_worker_measured():
    peer = Peer("p", lambda ids, n, t, s: [0] * n, lambda ids, n, t, s: ([1] * n, 0.25))
    assert peer.generate([1], 3, 0.0, 0) == ([1, 1, 1], 0.25)
    tokens, seconds = Peer("q", lambda ids, n, t, s: [0] * n).generate([1], 2, 0.0, 0)
    assert tokens == [0, 0] and seconds >= 0


def test_worker_that_cannot_load_is_unavailable(fake_genai, tmp_path):
    with pytest.raises(g.PeerUnavailable, match="did not start.*cannot load"):
        _worker(fake_genai, tmp_path, model="broken")


def test_worker_without_genai_is_unavailable(tmp_path):
    # the real worker script in an interpreter without onnxruntime_genai (-I: nothing from the test's paths)
    with pytest.raises(g.PeerUnavailable, match="ModuleNotFoundError|ImportError"):
        g.Worker([sys.executable, "-I", str(GENAI_WORKER), "model", "--threads", "1"], tmp_path / "w.log")


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_worker_that_dies_or_breaks_the_protocol(tmp_path):
    dies = _script(tmp_path, "dies.py", '''
        import sys
        print('{"ready": true, "version": "x"}', flush=True)
        sys.stdin.readline()
        sys.stderr.write("segfault-ish\\n")
        sys.exit(3)
    ''')
    worker = g.Worker([str(dies)], tmp_path / "dies.log")
    with pytest.raises(g.WorkerError, match="status 3.*segfault-ish"):
        worker.generate([1], 2, 0.0, 0)
    worker.close()
    short = _script(tmp_path, "short.py", '''
        import sys
        print('{"ready": true}', flush=True)
        for line in sys.stdin:
            print('{"tokens": [1], "seconds": 0.1}', flush=True)
    ''')
    worker = g.Worker([str(short)], tmp_path / "short.log")
    with pytest.raises(g.WorkerError, match="expected 2 tokens"):
        worker.generate([1], 2, 0.0, 0)
    worker.close()
    noise = _script(tmp_path, "noise.py", 'print("hello", flush=True)\n')
    with pytest.raises(g.PeerUnavailable, match="not JSON"):
        g.Worker([str(noise)], tmp_path / "noise.log")


def test_search_options():
    greedy = genai_worker.search_options(10, 5, 0.0, 7)
    assert greedy == {"max_length": 15, "min_length": 15, "do_sample": False}  # fixed length: EOS masked
    sampled = genai_worker.search_options(10, 5, 0.7, 7)
    assert sampled == {"max_length": 15, "min_length": 15, "do_sample": True, "temperature": 0.7, "top_k": 0,
                       "top_p": 1.0, "random_seed": 7}  # top_k 0 / top_p 1: genai's untruncated sampling
    assert json.loads(genai_worker.thread_overlay(2)) == \
        {"model": {"decoder": {"session_options": {"intra_op_num_threads": 2}}}}


@pytest.mark.parametrize("line, message", [
    ("nope", "not JSON"), ('{"ids": [1]}', "needs the keys"),
    ('{"ids": [], "new_tokens": 1, "temperature": 0, "seed": 0}', "ids"),
    ('{"ids": [1], "new_tokens": 0, "temperature": 0, "seed": 0}', "new_tokens"),
    ('{"ids": [1], "new_tokens": 1, "temperature": -1, "seed": 0}', "temperature"),
    ('{"ids": [1], "new_tokens": 1, "temperature": 0, "seed": -1}', "seed"),
])
def test_bad_requests(line, message):
    with pytest.raises(genai_worker.RequestError, match=message):
        genai_worker.parse_request(line)


# --- precision, source, cache ---------------------------------------------------------------------------------

def test_precision_follows_the_bundle():
    expected = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int4": "int4", "fp16-int8": "int8",
                "fp16-int4": "int4"}
    assert {d: g.genai_precision(d) for d in DTYPES if d != "bf16"} == expected
    with pytest.raises(g.PeerUnavailable):
        g.genai_precision("int3")
    with pytest.raises(g.PeerUnavailable, match="CUDA only"):
        g.genai_precision("bf16")


def test_sources(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert g.resolve_source(str(gguf)) == g.Source("gguf", str(gguf.resolve()))
    assert g.resolve_source(str(hf)) == g.Source("dir", str(hf.resolve()))
    assert g.resolve_source("HuggingFaceTB/SmolLM2-135M") == g.Source("hub", "HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(g.PeerUnavailable, match="neither"):
        g.resolve_source(str(tmp_path / "missing" / "model.bin"))
    with pytest.raises(g.PeerUnavailable, match="neither"):
        g.resolve_source(str(tmp_path))  # a directory without config.json


def test_cache_key_follows_size_mtime_path_and_precision(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF1")
    source = g.resolve_source(str(gguf))
    key = g.cache_key(source.fingerprint(), "int4")
    assert g.cache_key(source.fingerprint(), "int4") == key  # stable
    assert g.cache_key(source.fingerprint(), "fp32") != key
    os.utime(gguf, ns=(1, 1))
    touched = g.cache_key(source.fingerprint(), "int4")
    assert touched != key
    gguf.write_bytes(b"GGUF12")
    os.utime(gguf, ns=(1, 1))
    assert g.cache_key(source.fingerprint(), "int4") != touched  # same mtime, other size
    other = tmp_path / "n.gguf"
    other.write_bytes(b"GGUF12")
    os.utime(other, ns=(1, 1))
    assert g.cache_key(g.resolve_source(str(other)).fingerprint(), "int4") != touched  # other path


def test_directory_fingerprint_skips_hidden_files(tmp_path):
    hf = tmp_path / "hf"
    (hf / ".cache").mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    source = g.resolve_source(str(hf))
    before = g.cache_key(source.fingerprint(), "fp32")
    (hf / ".cache" / "lock").write_text("x")
    assert g.cache_key(source.fingerprint(), "fp32") == before
    (hf / "model.safetensors").write_text("w")
    assert g.cache_key(source.fingerprint(), "fp32") != before


def test_builder_commands(tmp_path):
    python, out, cache = Path("py"), tmp_path / "out", tmp_path / "cache"
    hub = g.builder_command(python, g.Source("hub", "org/model"), None, "int4", out, cache)
    assert hub[1:] == ["-I", "-m", g.BUILDER, "-m", "org/model", "-o", str(out), "-p", "int4", "-e", "cpu", "-c",
                       str(cache)]
    local = g.builder_command(python, g.Source("gguf", "/m.gguf"), tmp_path / "hf", "fp32", out, cache)
    assert local[4:6] == ["-i", str(tmp_path / "hf")]  # a GGUF goes through its converted directory


FAKE_BUILDER = '''
    import json, sys
    from pathlib import Path
    log = Path(__file__).with_name("calls.jsonl")
    with log.open("a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
    args = sys.argv[1:]
    if args[1].endswith("hf_from_gguf.py"):
        out = Path(args[3])
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
    else:
        out = Path(args[args.index("-o") + 1])
        out.mkdir(parents=True)
        for name in ("genai_config.json", "model.onnx"):
            (out / name).write_text("x")
'''


def test_build_once_then_cached(tmp_path):
    python = _script(tmp_path, "python", FAKE_BUILDER)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    source = g.resolve_source(str(gguf))
    notes: list[str] = []
    built = g.build_model(python, source, "int4", tmp_path / "peers", notes.append)
    assert g.is_built(built) and built == g.model_dir(source, "int4", tmp_path / "peers")
    assert json.loads((built / "specx-source.json").read_text())["precision"] == "int4"
    assert len(notes) == 1 and "once" in notes[0]
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 2 and calls[0][1].endswith("hf_from_gguf.py") and calls[1][2] == g.BUILDER
    assert g.build_model(python, source, "int4", tmp_path / "peers", notes.append) == built
    assert len(notes) == 1 and len((tmp_path / "calls.jsonl").read_text().splitlines()) == 2  # cached: no runs
    g.build_model(python, source, "fp32", tmp_path / "peers", notes.append)  # another precision: the builder only
    assert len((tmp_path / "calls.jsonl").read_text().splitlines()) == 3


def test_failed_build_names_its_log(tmp_path):
    python = _script(tmp_path, "python", 'import sys\nprint("no such model type")\nsys.exit(1)\n')
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(g.PeerUnavailable, match="builder.*no such model type.*log: "):
        g.build_model(python, g.resolve_source(str(hf)), "fp32", tmp_path / "peers", lambda note: None)
    assert not g.is_built(g.model_dir(g.resolve_source(str(hf)), "fp32", tmp_path / "peers"))


# --- finding the venv; the skip note --------------------------------------------------------------------------

def test_missing_venv_is_skipped_with_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv(g.PEERS_ENV, str(tmp_path / "peers"))
    monkeypatch.delenv(g.PYTHON_ENV, raising=False)
    notes: list[str] = []
    manifest = SimpleNamespace(dtype="int4", target=SimpleNamespace(source=str(tmp_path / "m.gguf")))
    assert load_peers(["onnxruntime-genai"], manifest, 2, notes.append) == []
    assert len(notes) == 1
    assert "--against onnxruntime-genai: skipped" in notes[0]
    assert f"{sys.executable} -m specx.peers_genai setup" in notes[0]
    assert str(tmp_path / "peers" / "genai-venv") in notes[0]


def test_python_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(g.PYTHON_ENV, str(tmp_path / "nope"))
    with pytest.raises(g.PeerUnavailable, match=f"{g.PYTHON_ENV}=.*nope"):
        g.find_python()
    python = _script(tmp_path, "python3", "")
    monkeypatch.setenv(g.PYTHON_ENV, str(python))
    assert g.find_python() == python


def test_torch_pin(monkeypatch):
    monkeypatch.setenv(g.TORCH_ENV, "2.13.0")
    assert g.torch_requirement() == "torch==2.13.0"
