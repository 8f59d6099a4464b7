"""Progress: plain lines (not redraws) when stderr is not a terminal, one summary line either way."""

import logging

from lvaa_jax import progress


def records(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "lvaa_jax.progress"]


def test_lines_not_redraws_in_a_log(caplog, capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="lvaa_jax"):
        with progress.progress_bar(total=4, desc="train", unit="step") as bar:
            for _ in range(4):
                bar.update()
                bar.set_postfix(loss="0.125")
    lines = records(caplog)
    assert lines[0].startswith("train: 1/4 step (25%), ~") and lines[-2].startswith("train: 4/4 step (100%)")
    assert lines[-1].startswith("train: 4 step in 0:00") and lines[-1].endswith("; loss 0.125")
    assert "\r" not in capsys.readouterr().err


def test_iteration_summarises_once_and_disable_is_silent(caplog):
    with caplog.at_level(logging.INFO, logger="lvaa_jax"):
        assert list(progress.progress_bar(range(3), desc="embed", unit="batch")) == [0, 1, 2]
        assert list(progress.progress_bar(range(3), desc="quiet", disable=True)) == [0, 1, 2]
    assert len(records(caplog)) == 1 and records(caplog)[0].startswith("embed: 3 batch in ")


def test_an_unfinished_run_says_how_far_it_got(caplog):
    with caplog.at_level(logging.INFO, logger="lvaa_jax"):
        with progress.progress_bar(total=10, initial=4, desc="train", unit="step") as bar:
            bar.update()
    assert records(caplog) == [records(caplog)[0]] and records(caplog)[0].startswith("train: 5/10 step in 0:00")
