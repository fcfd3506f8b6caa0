"""onnxruntime-genai as a peer of ``specx bench``: its own venv, its own model build (cached), its own C++ loop.

onnxruntime-genai depends on plain onnxruntime, which must never land in specx's environment (it would shadow
onnxruntime-gpu), so the peer lives in a venv of its own and is driven through a pipe:

    python -m specx.peers_genai setup      # once: $SPECX_PEERS/genai-venv (onnxruntime-genai 0.18.0, its builder's
                                           # needs: onnx-ir, onnx, transformers, torch, gguf, accelerate)

``specx bench --against onnxruntime-genai`` then finds that venv (or the python named by SPECX_GENAI_PYTHON), builds
the bundle's target source with genai's builder once (a local Hugging Face directory, a .gguf through
specx/peer_workers/hf_from_gguf.py, or a hub id the builder downloads) at the precision of the bundle, caches it
under $SPECX_PEERS/genai-models keyed by the source's files (path, size, mtime), the precision and the genai
version, and decodes in a long-lived worker (specx/peer_workers/genai_worker.py) that times each generation itself.
SPECX_PEERS defaults to ~/.cache/specx-peers. Standard library only: importing this pulls in nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Sequence

from specx.graphs.precision import PRECISIONS
from specx.peer_workers import GENAI_WORKER, HF_FROM_GGUF

GENAI_VERSION = "0.18.0"
PEERS_ENV = "SPECX_PEERS"
PYTHON_ENV = "SPECX_GENAI_PYTHON"
TORCH_ENV = "SPECX_TORCH_VERSION"
DEFAULT_PEERS_DIR = Path("~/.cache/specx-peers")
VENV_NAME = "genai-venv"
MODELS_DIR = "genai-models"
LOGS_DIR = "logs"
# torch comes separately (see torch_requirement): an unpinned torch pulls a multi-GB CUDA build on Linux.
PEER_PACKAGES = (f"onnxruntime-genai=={GENAI_VERSION}", "onnx-ir", "onnx", "transformers", "gguf", "accelerate")
PEER_MODULES = ("onnxruntime_genai", "onnx_ir", "onnx", "transformers", "gguf", "accelerate", "torch", "tokenizers")
BUILDER = "onnxruntime_genai.models.builder"
BUILD_PROVIDER = "cpu"  # the peer venv has onnxruntime-genai's CPU build
READY_FILES = ("genai_config.json", "model.onnx")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LOG_TAIL_LINES = 8
STOP_SECONDS = 10.0


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (no venv, unsupported bundle, failed build); the message says what to do."""


class WorkerError(RuntimeError):
    """The worker failed or broke the protocol in the middle of a benchmark."""


# --- where things are -------------------------------------------------------------------------------------------

def peers_dir() -> Path:
    return Path(os.environ.get(PEERS_ENV) or DEFAULT_PEERS_DIR).expanduser()


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def setup_command() -> str:
    """The exact command that creates the peer's venv, with this interpreter (the one specx runs in)."""
    return f"{shlex.quote(sys.executable)} -m specx.peers_genai setup"


def find_python() -> Path:
    """SPECX_GENAI_PYTHON, else $SPECX_PEERS/genai-venv's python; PeerUnavailable naming the setup command if absent."""
    named = os.environ.get(PYTHON_ENV)
    python = Path(named).expanduser() if named else venv_python(peers_dir() / VENV_NAME)
    if not python.is_file():
        origin = f"{PYTHON_ENV}={named}" if named else str(python)
        raise PeerUnavailable(f"its venv is missing ({origin} not found): create it with `{setup_command()}` "
                              f"(downloads onnxruntime-genai {GENAI_VERSION} and its builder's needs from PyPI), or "
                              f"set {PYTHON_ENV} to a python that has them")
    return python


# --- what to build ----------------------------------------------------------------------------------------------

def genai_precision(dtype: str) -> str:
    """The builder's --precision for a bundle dtype: the same weights (int4 -> int4, int8 -> int8, fp32 -> fp32,
    fp16 -> fp16). fp16-int4 / fp16-int8 map to int4 / int8: the peer runs genai's CPU build, whose quantized models
    take float32 activations (as specx's int4 / int8 do)."""
    precision = PRECISIONS.get(dtype)
    if precision is None:
        raise PeerUnavailable(f"no onnxruntime-genai precision for dtype {dtype!r}")
    if not precision.cpu_runs:
        raise PeerUnavailable(f"{dtype} runs on CUDA only and the peer runs onnxruntime-genai's CPU build")
    if precision.bits is not None:
        return f"int{precision.bits}"
    return precision.float_name


@dataclass(frozen=True)
class Source:
    """The bundle's target source as genai's builder takes it."""
    kind: str  # "dir" | "gguf" | "hub"
    location: str  # resolved path, or the hub id

    def fingerprint(self) -> dict:
        """What the cached build depends on: each file's path, size and mtime (a hub id: the id itself)."""
        if self.kind == "hub":
            return {"hub": self.location}
        path = Path(self.location)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not
                                                      any(part.startswith(".") for part in p.relative_to(path).parts))
        return {"path": self.location,
                "files": [[str(f.relative_to(path)) if f != path else f.name, f.stat().st_size, f.stat().st_mtime_ns]
                          for f in files]}


def resolve_source(source: str) -> Source:
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return Source("gguf", str(path.resolve()))
    if path.is_dir() and (path / "config.json").is_file():
        return Source("dir", str(path.resolve()))
    if not path.exists() and HUB_ID.match(source):
        return Source("hub", source)
    raise PeerUnavailable(f"target source {source!r} is neither a Hugging Face directory, a .gguf file nor a hub id "
                          f"(onnxruntime-genai's builder needs one of them)")


def cache_key(fingerprint: dict, precision: str) -> str:
    blob = json.dumps({**fingerprint, "precision": precision, "genai": GENAI_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_dir(source: Source, precision: str, root: Path) -> Path:
    return root / MODELS_DIR / f"{precision}-{cache_key(source.fingerprint(), precision)}"


def is_built(path: Path) -> bool:
    return all((path / name).is_file() for name in READY_FILES)


# --- building (once) --------------------------------------------------------------------------------------------

def _run_logged(command: Sequence[str], log: Path, what: str) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        done = subprocess.run(list(command), stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise PeerUnavailable(f"{what} failed (exit {done.returncode}): {last_line(log)} (log: {log})")


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()] \
        if log.is_file() else []
    return lines[-1] if lines else "no output"


def _into_place(build: Callable[[Path], None], final: Path) -> Path:
    part = final.with_name(final.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    build(part)
    shutil.rmtree(final, ignore_errors=True)
    part.rename(final)
    return final


def hf_dir_for_gguf(python: Path, gguf: Source, root: Path) -> Path:
    """A Hugging Face directory converted from the GGUF (cached like the models: by the file's size and mtime)."""
    final = root / MODELS_DIR / f"hf-{cache_key(gguf.fingerprint(), 'hf')}"
    if (final / "config.json").is_file():
        return final
    log = root / LOGS_DIR / f"{final.name}.log"
    return _into_place(lambda part: _run_logged([str(python), "-I", str(HF_FROM_GGUF), gguf.location, str(part)],
                                                log, f"converting {gguf.location} to a Hugging Face directory"),
                       final)


def builder_command(python: Path, source: Source, hf_dir: Path | None, precision: str, out: Path,
                    cache: Path) -> list[str]:
    """genai's builder (its --help crashes in 0.18.0; flags from builder.py's get_args())."""
    origin = ["-m", source.location] if source.kind == "hub" else ["-i", str(hf_dir or source.location)]
    return [str(python), "-I", "-m", BUILDER, *origin, "-o", str(out), "-p", precision, "-e", BUILD_PROVIDER,
            "-c", str(cache)]


def build_model(python: Path, source: Source, precision: str, root: Path,
                note: Callable[[str], None]) -> Path:
    """genai's model of ``source`` at ``precision``, built once into the cache."""
    final = model_dir(source, precision, root)
    if is_built(final):
        return final
    note(f"onnxruntime-genai: building its {precision} model of {source.location} once (minutes) -> {final}")
    hf_dir = hf_dir_for_gguf(python, source, root) if source.kind == "gguf" else None
    final.parent.mkdir(parents=True, exist_ok=True)
    log = root / LOGS_DIR / f"{final.name}.log"

    def build(part: Path) -> None:
        _run_logged(builder_command(python, source, hf_dir, precision, part, root / "genai-cache"), log,
                    f"onnxruntime-genai's builder ({precision})")
        (part / "specx-source.json").write_text(json.dumps({**source.fingerprint(), "precision": precision,
                                                            "genai": GENAI_VERSION}, indent=1) + "\n")

    return _into_place(build, final)


# --- the worker -------------------------------------------------------------------------------------------------

def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        if process.stdin:
            process.stdin.close()
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout:
        process.stdout.close()


class Worker:
    """A long-lived decoding process: one JSON line in, one JSON line out (protocol: peer_workers/genai_worker.py)."""

    def __init__(self, command: Sequence[str], log: Path):
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        with log.open("w") as err:
            self.process = subprocess.Popen(list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=err, text=True, encoding="utf-8", bufsize=1)
        self._finalizer = weakref.finalize(self, _stop, self.process)
        try:
            ready = self._read(PeerUnavailable)
            if "error" in ready or not ready.get("ready"):
                raise PeerUnavailable(f"its worker did not start: {ready.get('error', ready)} (log: {log})")
        except PeerUnavailable:
            self.close()
            raise
        self.version = str(ready.get("version", ""))

    def _read(self, error: type[RuntimeError]) -> dict:
        line = self._stdout.readline()
        if not line:
            self.process.wait(STOP_SECONDS)
            raise error(f"worker exited (status {self.process.returncode}): {last_line(self.log)} (log: {self.log})")
        try:
            reply = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"worker wrote a line that is not JSON: {line[:200]!r}") from exc
        if not isinstance(reply, dict):
            raise error(f"worker wrote {reply!r}, not an object")
        return reply

    @property
    def _stdout(self) -> IO[str]:
        assert self.process.stdout is not None  # noqa: S101  (created with stdout=PIPE)
        return self.process.stdout

    def generate(self, ids: list[int], new_tokens: int, temperature: float, seed: int) -> tuple[list[int], float]:
        """Tokens and the seconds the worker measured around the generation."""
        request = {"ids": [int(i) for i in ids], "new_tokens": new_tokens, "temperature": temperature, "seed": seed}
        try:
            assert self.process.stdin is not None  # noqa: S101  (created with stdin=PIPE)
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise WorkerError(f"worker is gone: {last_line(self.log)} (log: {self.log})") from exc
        reply = self._read(WorkerError)
        if "error" in reply:
            raise WorkerError(f"worker: {reply['error']}")
        tokens, seconds = reply.get("tokens"), reply.get("seconds")
        if not isinstance(tokens, list) or len(tokens) != new_tokens or not isinstance(seconds, (int, float)):
            raise WorkerError(f"worker replied {str(reply)[:200]}, expected {new_tokens} tokens and seconds")
        return [int(t) for t in tokens], float(seconds)

    def close(self) -> None:
        self._finalizer()


def worker_command(python: Path, model: Path, threads: int) -> list[str]:
    return [str(python), "-I", str(GENAI_WORKER), str(model), "--threads", str(threads)]


# --- setup ------------------------------------------------------------------------------------------------------

def torch_requirement() -> str:
    """torch for the peer venv: SPECX_TORCH_VERSION, else the version specx's own environment has (a CPU build there
    resolves the same way here), else unpinned."""
    version = os.environ.get(TORCH_ENV)
    if not version:
        from importlib.metadata import PackageNotFoundError, version as installed

        try:
            version = installed("torch").split("+")[0]
        except PackageNotFoundError:
            return "torch"
    return f"torch=={version}"


def has_modules(python: Path) -> bool:
    check = f"import {', '.join(PEER_MODULES)}"
    return python.is_file() and subprocess.run([str(python), "-I", "-c", check], capture_output=True,
                                               check=False).returncode == 0


def setup(root: Path, out: IO[str] = sys.stdout) -> Path:
    """Create (or complete) $SPECX_PEERS/genai-venv; its python."""
    venv = root / VENV_NAME
    python = venv_python(venv)
    if has_modules(python):
        print(f"exists: {python}", file=out)
        return python
    if not python.is_file():
        print(f"creating {venv}", file=out)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    packages = [*PEER_PACKAGES, torch_requirement()]
    print(f"installing {' '.join(packages)} (log: {root / LOGS_DIR / 'genai-pip.log'})", file=out)
    _run_logged([str(python), "-m", "pip", "install", *packages], root / LOGS_DIR / "genai-pip.log",
                "pip install into the onnxruntime-genai venv")
    if not has_modules(python):
        raise PeerUnavailable(f"{python} still misses one of {', '.join(PEER_MODULES)} after pip install")
    print(f"ready: {python}", file=out)
    return python


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["setup"]:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        setup(peers_dir())
    except (PeerUnavailable, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
