"""scripts/align.py end to end in a subprocess: the outputs of a good run, and a one-line error for bad input."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from lvaa_jax.embeddings.table import save_table

ROOT = Path(__file__).resolve().parents[1]
N = 40


def run_align(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/align.py", "--config=configs/default.py:tiny", *flags],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ), timeout=300)


def write_tables(folder: Path, instructions_b=None) -> None:
    rng = np.random.default_rng(0)
    instructions = [f"go to the box {i}" for i in range(N)]
    base = rng.standard_normal((N, 6))
    save_table(folder / "agent.npz", base @ rng.standard_normal((6, 12)), instructions, {"model": "agent"})
    layers = np.stack([base @ rng.standard_normal((6, 20)) + s * rng.standard_normal((N, 20)) for s in (0, 1)])
    save_table(folder / "minilm.npz", layers, instructions_b or instructions, {"model": "minilm"})


def test_align_script_writes_every_output(tmp_path):
    write_tables(tmp_path / "embeddings")
    out = tmp_path / "alignment"
    result = run_align(f"--embeddings={tmp_path / 'embeddings'}", "--k=4", f"--out={out}",
                       "--config.align.clamp_outliers=True")
    assert result.returncode == 0, result.stderr
    assert "agent ~ minilm" in result.stdout
    for metric in ("precision_at_k", "precision_at_k_best_layers", "precision_calibrated", "procrustes", "cka",
                   "cka_debiased", "rsa"):
        with open(out / f"{metric}.csv") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["space", "agent", "minilm"] and [r[0] for r in rows[1:]] == ["agent", "minilm"]
        matrix = np.asarray([[float(v) for v in r[1:]] for r in rows[1:]])
        np.testing.assert_allclose(matrix, matrix.T)
        assert json.loads((out / f"{metric}.json").read_text())["names"] == ["agent", "minilm"]
        assert (out / f"{metric}.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["k"] == 4 and summary["n"] == N and summary["settings"]["clamp_outliers"] is True
    assert [(p["a"], p["b"]) for p in summary["pairs"]] == [("agent", "minilm")]
    report = (out / "report.md").read_text()
    assert "## Headline: precision@4" in report and f"k/(N-1) = {4 / (N - 1):.4f}" in report
    assert (out / "layers_minilm.png").exists() and (out / "k_sweep.csv").exists()


def test_align_script_bad_input_is_one_line_error(tmp_path):
    write_tables(tmp_path, instructions_b=[f"go to the box {i}" for i in reversed(range(N))])
    result = run_align(f"--embeddings={tmp_path}", f"--out={tmp_path / 'out'}")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: minilm: same instructions as agent in a different order")
    assert "Traceback" not in result.stderr

    result = run_align(f"--embeddings={tmp_path / 'missing'}", f"--out={tmp_path / 'out'}")
    assert result.returncode == 2
    missing = tmp_path / "missing"
    assert result.stderr.strip().splitlines()[-1] == f"error: {missing}: no such folder of embedding tables"
