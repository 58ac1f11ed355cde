"""The examples run on CPU: train_gpt.py (jit, then KV-cache generation) and train_gpt_pmap.py on 8
host devices give the same losses; the quickstart notebook's code cells execute in order.

Each runs in a subprocess: the 8 host devices must be set before JAX starts, and the notebook
gets a fresh interpreter like a user's kernel."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _run_python(code: str, **env) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=EXAMPLES,
                            env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_train_gpt_jit_and_pmap_agree_and_generate():
    """A few steps of each: the data-parallel step over 8 devices computes the same loss as the
    single-device one (same data, averaged gradients), and generation runs from the cache."""
    out = _run_python("""
        import re, contextlib, io
        import train_gpt, train_gpt_pmap

        def losses(main, args):
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                main(args)
            text = buffer.getvalue()
            print(text)
            return [float(x) for x in re.findall(r"step \\d+/3 loss ([0-9.]+)", text)], text

        common = ["--tiny", "--steps", "3", "--log-every", "1"]
        jit_losses, jit_text = losses(train_gpt.main, common + ["--generate", "6"])
        pmap_losses, pmap_text = losses(train_gpt_pmap.main, common + ["--generate", "0"])
        assert "8 x cpu" in pmap_text, pmap_text
        assert len(jit_losses) == 3 and jit_losses[-1] < jit_losses[0], jit_losses
        assert len(pmap_losses) == 3, pmap_losses
        assert all(abs(a - b) < 1e-4 for a, b in zip(jit_losses, pmap_losses)), (jit_losses,
                                                                                 pmap_losses)
        samples = re.findall(r"'([^']*)' -> '([^']*)'", jit_text)
        assert len(samples) == 2 and all(len(generated) == 6 for _, generated in samples)
        print("OK")
        """, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    assert out.rstrip().endswith("OK"), out


def test_quickstart_notebook_executes():
    notebook = json.loads((EXAMPLES / "quickstart.ipynb").read_text())
    assert notebook["nbformat"] == 4
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code_cells and all(cell["outputs"] == [] and cell["execution_count"] is None
                              for cell in code_cells)  # checked in without outputs
    out = _run_python("""
        import json
        notebook = json.load(open("quickstart.ipynb"))
        namespace = {}
        for cell in notebook["cells"]:
            if cell["cell_type"] == "code":
                exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)
        print("OK")
        """, MPLBACKEND="Agg")
    assert "largest difference" in out and out.rstrip().endswith("OK"), out
