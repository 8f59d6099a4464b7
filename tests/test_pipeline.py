"""The whole study through its one entry point, on a tiny config; then re-run, which must skip every stage."""

import csv
import json
from pathlib import Path

import chex
import ml_collections
import numpy as np
import pytest
from script_runs import run_script, user_error

from configs.default import get_config
from lvaa_jax.agent import restore_agent
from lvaa_jax.agent.snapshots import load_snapshots
from lvaa_jax.alignment.training_curve import HEADING, console_table
from lvaa_jax.embeddings import embed_instructions, load_table
from lvaa_jax.errors import LvaaError
from lvaa_jax.pipeline import STAGES, headline, run_pipeline
from lvaa_jax.runlock import LOCK_FILE

pytest.importorskip("transformers")
from tiny_models import tiny_decoder  # noqa: E402


def tiny_study(tmp_path: Path) -> ml_collections.ConfigDict:
    config = get_config("tiny")
    config.data.num_workers = 0
    config.embed.models = ml_collections.ConfigDict({
        "tiny_gpt2": dict(source=tiny_decoder(tmp_path / "tiny_gpt2"), kind="decoder", pooling="mean", layers="all",
                          gguf_file="", revision="", dtype="float32"),
    })
    config.embed.device = "cpu"
    return config


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    config = tiny_study(root)
    report = run_pipeline(config, root / "run", progress=False)
    return config, root / "run", report


def test_every_artifact_exists_and_is_well_formed(study):
    config, workdir, report = study
    assert (workdir / "demos" / "manifest.json").exists()
    assert (workdir / "eval" / f"step_{config.train.steps:08d}.json").exists()
    spaces = {"action", "untrained_agent", "bag_of_words", "random", "tiny_gpt2"}
    assert {p.stem for p in (workdir / "embeddings").glob("*.npz")} == spaces
    tables = {name: load_table(workdir / "embeddings" / f"{name}.npz") for name in spaces}
    assert len({t.instructions for t in tables.values()}) == 1
    assert tables["action"].num_layers == config.model.instruction_layers + 1
    assert tables["tiny_gpt2"].num_layers == 3  # input embeddings + 2 layers
    text = report.read_text()
    for heading in ("## Headline: precision@5", "## Agent: closed-loop success", "## Run metadata", "## k sweep"):
        assert heading in text
    summary = json.loads((workdir / "alignment" / "summary.json").read_text())
    assert summary["n"] == 36 and summary["k"] == config.align.k
    assert len(summary["pairs"]) == len(spaces) * (len(spaces) - 1) // 2
    with open(workdir / "alignment" / "precision_at_k.csv") as f:
        rows = list(csv.reader(f))
    matrix = np.asarray([r[1:] for r in rows[1:]], float)
    np.testing.assert_allclose(np.diag(matrix), 1.0)
    np.testing.assert_allclose(matrix, matrix.T)
    assert list((workdir / "alignment").glob("*.png"))
    assert "action~tiny_gpt" in headline(workdir / "alignment")
    # Kinds reach the alignment from the embedding stage's table metadata; one decoder: no baseline pair.
    assert {t.meta["kind"] for t in tables.values()} == {"action", "control", "decoder"}
    assert "Decoders, last layers: only one in the panel (tiny_gpt2)" in headline(workdir / "alignment")
    assert "## Language-model baseline" in text
    assert set(json.loads((workdir / "pipeline.json").read_text())["runs"][0]["seconds"]) == set(STAGES)


def test_alignment_over_training_ends_on_the_headline(study):
    config, workdir, report = study
    snapshots = load_snapshots(workdir)
    assert list(snapshots) == [0, 10, 20]
    tables = {name: load_table(workdir / "embeddings" / f"{name}.npz") for name in ("untrained_agent", "action")}
    np.testing.assert_array_equal(snapshots[0].embeddings, tables["untrained_agent"].embeddings)
    np.testing.assert_array_equal(snapshots[20].embeddings, tables["action"].embeddings)
    text = report.read_text()
    assert f"## {HEADING}" in text and "| step | train accuracy | success | untrained_agent |" in text
    assert (workdir / "alignment" / "training_curve.png").stat().st_size > 0
    with open(workdir / "alignment" / "training_curve.csv") as f:
        curve = [r for r in csv.DictReader(f) if r["step"] == "20"]
    with open(workdir / "alignment" / "headline.csv") as f:
        headline = {r["b"]: r for r in csv.DictReader(f) if r["a"] == "action"}
    assert [r["space"] for r in curve] == sorted(headline, key=list(headline).index) == [
        "untrained_agent", "bag_of_words", "random", "tiny_gpt2"]
    for r in curve:  # the last snapshot is the action table: same neighbours, same permutations
        for key in ("precision", "null_mean", "p_value"):
            assert float(r[key]) == pytest.approx(float(headline[r["space"]][f"{key}_last"]), abs=1e-9)
    table = console_table(workdir / "alignment").splitlines()  # what scripts/run_pipeline.py prints
    assert table[1].split() == ["step", "0", "10", "20"] and len(table) == 2 + 4
    assert table[-1].split()[0] == "tiny_gpt2" and float(table[-1].split()[-1]) == pytest.approx(
        float(curve[-1]["precision"]), abs=5e-4)
    assert console_table(workdir) == ""  # no curve there


def test_align_script_scores_the_snapshots_of_its_run_folder(study, tmp_path):
    _, workdir, _ = study
    result = run_script("align.py", "--config=configs/default.py:tiny", f"--workdir={workdir}", f"--out={tmp_path}",
                        "--config.align.permutations=5", "--config.align.bootstrap=5")
    assert result.returncode == 0, result.stderr
    assert f"## {HEADING}" in (tmp_path / "report.md").read_text()
    assert len((tmp_path / "training_curve.csv").read_text().splitlines()) == 1 + 3 * 4


def test_rerun_skips_every_stage(study):
    config, workdir, report = study
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file() and "logs" not in p.parts}
    run_pipeline(config, workdir, progress=False)
    after = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file() and "logs" not in p.parts}
    changed = {p.relative_to(workdir) for p in after if before.get(p) != after[p]}
    assert changed == {Path("pipeline.json"), Path("embeddings/instructions.json"), Path(LOCK_FILE)}
    assert json.loads((workdir / "pipeline.json").read_text())["runs"][1]["seconds"]["train"] < 30


def comparable(workdir: Path) -> dict[str, object]:
    """Every artifact of a run folder as it must repeat, bit for bit, in a second run of the same config and
    seed on the same machine. Taken out, because they record when, where or how fast the run went: logs/,
    pipeline.json, tensorboard event files (wall times, host name), train.csv's steps_per_s, every "date"
    and "*_seconds" in metadata, the run folder's own path, the report's run-metadata section, and the
    tables' and snapshots' sha256 in alignment/inputs.json (an .npz is a zip whose entries carry their write
    time, so tables are compared by content). Orbax names checkpoint data files at random and stamps them: checkpoints are compared by
    their data item and, in the test, by the restored parameters."""

    def undated(obj):
        if isinstance(obj, dict):
            return {k: undated(v) for k, v in obj.items() if k != "date" and not k.endswith("_seconds")}
        return [undated(v) for v in obj] if isinstance(obj, list) else obj

    out = {}
    for path in sorted(p for p in workdir.rglob("*") if p.is_file()):
        name = str(path.relative_to(workdir))
        if (name.startswith(("logs/", "pipeline.json")) or "tfevents" in name
                or name.startswith("checkpoints/") and not name.endswith(("config.json", "data/metadata"))):
            continue
        if path.suffix == ".npz":
            table = load_table(path)
            meta = json.loads(json.dumps(table.meta).replace(str(workdir), "<run>"))
            out[name] = (table.embeddings.tobytes(), table.instructions, undated(meta))
            continue
        data = path.read_bytes().replace(str(workdir).encode(), b"<run>")
        if path.suffix == ".json":
            out[name] = undated(json.loads(data))
            if name == "alignment/inputs.json":
                out[name].pop("tables"), out[name].pop("snapshots")
        elif name == "metrics/train.csv":
            rows = list(csv.DictReader(data.decode().splitlines()))
            out[name] = [{k: v for k, v in row.items() if k != "steps_per_s"} for row in rows]
        elif name == "alignment/report.md":
            out[name] = data.split(b"## Run metadata")[0]
        else:
            out[name] = data
    return out


def test_same_config_and_seed_give_identical_artifacts(study, tmp_path):
    """Demos, checkpoints, metrics, evaluations, embedding tables, alignment matrices, figures and report:
    docs/robustness.md says what repeats where (another CPU, another XLA, a GPU)."""
    config, workdir, _ = study
    again = tmp_path / "run"
    run_pipeline(config, again, progress=False)
    first, second = comparable(workdir), comparable(again)
    assert sorted(first) == sorted(second)
    assert [name for name in first if first[name] != second[name]] == []
    assert len(first) > 40  # demos, metrics, eval, embeddings, alignment: the comparison covers them
    chex.assert_trees_all_equal(restore_agent(workdir).params, restore_agent(again).params)


def test_user_instruction_file_flags_instructions_the_agent_never_saw(study, tmp_path):
    config, workdir, _ = study
    (tmp_path / "run").symlink_to(workdir)
    file = tmp_path / "instructions.txt"
    file.write_text("go to the red ball\n\ngo to a purple key\nfly to the moon\n")
    config = ml_collections.ConfigDict(config.to_dict())
    config.embed.instructions = str(file)
    config.embed.models = ml_collections.ConfigDict()
    out = tmp_path / "copy"
    out.mkdir()
    for name in ("demos", "checkpoints"):
        (out / name).symlink_to(workdir / name)
    tables = embed_instructions(config, out, progress=False)
    assert load_table(tables["action"]).instructions == ("fly to the moon", "go to a purple key", "go to the red ball")
    flags = json.loads((out / "embeddings" / "instructions.json").read_text())
    assert "fly to the moon" in flags["unseen_in_training"]
    assert flags["unknown_words"] == {"fly to the moon": ["fly", "moon"]}
    file.write_text("go to the red ball\ngo to the red ball\n")
    with pytest.raises(LvaaError, match="duplicate instruction 'go to the red ball'"):
        embed_instructions(config, out, progress=False)
    file.write_text("\n")
    with pytest.raises(LvaaError, match="empty instruction list"):
        embed_instructions(config, out, progress=False)


def test_bad_embedding_settings_are_one_line_errors(study, tmp_path):
    config, workdir, _ = study
    config = ml_collections.ConfigDict(config.to_dict())
    with pytest.raises(LvaaError, match="missions.json: missing"):
        embed_instructions(config, tmp_path, progress=False)
    config.embed.controls = ("bag_of_word",)
    with pytest.raises(LvaaError, match="unknown control 'bag_of_word'"):
        embed_instructions(config, workdir, progress=False)


def test_script_reports_a_config_typo_on_one_line(tmp_path):
    result = run_script("run_pipeline.py", "--config=configs/default.py:tiny", f"--workdir={tmp_path}",
                        "--config.train.stpes=3")
    assert user_error(result) == "error: bad flag: 'stpes' Did you mean \"steps\" instead of \"stpes\"?"

