"""Scripts that peers' own Python environments run, by path (``python -I <script>``), for ``specx bench --against``.

They import nothing from specx (a peer's venv does not have it installed) and ship with the package, so a user who
pip-installed specx has them without the repository's benchmarks/ folder:

    genai_worker.py   onnxruntime-genai's decoding loop behind a JSON-lines pipe (specx.peers_genai starts it)
    hf_from_gguf.py   a Hugging Face directory from a GGUF file (onnxruntime-genai's builder reads those)
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
GENAI_WORKER = HERE / "genai_worker.py"
HF_FROM_GGUF = HERE / "hf_from_gguf.py"
