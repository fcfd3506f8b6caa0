"""The runtime (and `specx run`) must work with torch, transformers, onnx and optimum unimportable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent("""
    import sys
    BLOCKED = ("torch", "transformers", "onnx", "optimum", "onnxscript")
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, Blocker())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def test_blocker_really_blocks():
    proc = _run("import torch")
    assert proc.returncode != 0 and "blocked" in proc.stderr


def test_runtime_generates_without_torch(gpt2_bundle):
    proc = _run(f"""
        import json, sys
        from specx.runtime import Generator
        gen = Generator.load({str(gpt2_bundle)!r}, provider="auto")
        r = gen.generate("one two", max_new_tokens=8, ignore_eos=True)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({{"tokens": r.tokens, "loaded": loaded}}))
    """)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["tokens"]) == 8 and out["loaded"] == []


def test_cli_run_without_torch(gpt2_bundle):
    proc = _run(f"""
        import sys
        from specx.cli import main
        sys.argv = ["specx", "run", "--model", {str(gpt2_bundle)!r}, "--prompt", "one", "--max-new-tokens", "4", "--json"]
        main()
    """)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["stats"]["new_tokens"] >= 1
