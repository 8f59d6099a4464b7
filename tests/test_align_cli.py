"""scripts/align.py end to end in a subprocess: the outputs of a good run, and a one-line error for bad input."""

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
from script_runs import run_script, user_error

from lvaa_jax.embeddings.table import save_table

N = 40


def run_align(*flags: str) -> subprocess.CompletedProcess:
    return run_script("align.py", "--config=configs/default.py:tiny", *flags)


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
    assert user_error(result).startswith("error: minilm: same instructions as agent in a different order")

    result = run_align(f"--embeddings={tmp_path / 'missing'}", f"--out={tmp_path / 'out'}")
    assert user_error(result) == f"error: {tmp_path / 'missing'}: no such folder of embedding tables"
