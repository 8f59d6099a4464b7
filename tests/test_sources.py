"""Models split over part packages: fake part packages (real ``*.dist-info`` folders on a temporary
sys.path) joined, checked and refused; nothing is downloaded."""

import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fake_parts import make_site, register, split

from lvaa_jax.embeddings import sources
from lvaa_jax.embeddings.spec import ModelSpec
from lvaa_jax.errors import LvaaError


@pytest.fixture
def site(tmp_path, monkeypatch):
    return make_site(tmp_path, monkeypatch)


def test_parts_join_into_the_cache_once(site, monkeypatch):
    data = np.random.default_rng(0).bytes(3 << 20)  # over several 1 MiB read blocks
    register(monkeypatch, site, "plain", split(data, (1000, 2 << 20)), file="model.gguf")
    folder = sources.join_parts("plain")
    assert folder == sources.parts_folder("plain") and folder.parent.name == "parts"
    assert (folder / "model.gguf").read_bytes() == data
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left
    monkeypatch.setattr(sources, "sha256_file", lambda path: pytest.fail("hashed again"))
    assert sources.file_sha256(folder / "model.gguf") == hashlib.sha256(data).hexdigest()  # remembered when joined
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(site)])  # parts gone: the cache suffices
    assert sources.join_parts("plain") == folder


def test_a_missing_part_is_named_with_the_way_to_fetch_it(site, monkeypatch):
    register(monkeypatch, site, "gap", [b"ab", b"cd", b"ef"], skip=(1,), file="model.gguf")
    with pytest.raises(LvaaError) as error:
        sources.join_parts("gap", "embed.models.gap")
    assert str(error.value) == ("embed.models.gap: parts:gap needs the package fake-gap-part-2==1.0, not installed: "
                                "run python scripts/fetch_models.py (with your --config, if not the default)")
    assert not sources.parts_folder("gap").parent.exists() or not any(sources.parts_folder("gap").parent.iterdir())
    assert sources.missing_parts("gap") == ["fake-gap-part-2==1.0"]


def test_another_version_counts_as_missing(site, monkeypatch):
    register(monkeypatch, site, "old", [b"ab", b"cd"], file="model.gguf")
    monkeypatch.setitem(sources.PARTS, "old", sources.PARTS["old"].__class__(
        **{**sources.PARTS["old"].__dict__, "version": "2.0"}))
    assert sources.missing_parts("old") == ["fake-old-part-1==2.0", "fake-old-part-2==2.0"]
    with pytest.raises(LvaaError, match=r"needs the package fake-old-part-1==2.0 \(and 1 more of its 2\), not installed"):
        sources.join_parts("old")


def test_an_altered_byte_is_refused_by_its_hash(site, monkeypatch):
    parts = [b"0123456789", b"abcdefghij"]
    register(monkeypatch, site, "bad", parts, file="model.gguf")
    good = sources.PARTS["bad"].sha256
    (site / "fake-bad-part-2-files/input/model.bin.001").write_bytes(b"abcdefghiJ")
    altered = hashlib.sha256(b"0123456789abcdefghiJ").hexdigest()
    with pytest.raises(LvaaError) as error:
        sources.join_parts("bad")
    assert str(error.value) == (
        f"parts:bad: the parts of parts:bad join to sha256 {altered}, not {good}: a part is altered; re-fetch them: "
        "python scripts/fetch_models.py --reinstall (with your --config, if not the default)")
    assert not sources.parts_folder("bad").exists()
    assert list(sources.parts_folder("bad").parent.iterdir()) == []  # the half-made folder is gone


def test_a_short_part_is_refused_by_its_size(site, monkeypatch):
    register(monkeypatch, site, "short", [b"0123456789", b"abc"], file="model.gguf")
    (site / "fake-short-part-2-files/input/model.bin.001").write_bytes(b"ab")
    with pytest.raises(LvaaError, match=r"parts:short join to 12 bytes, not 13: re-fetch them"):
        sources.join_parts("short")


def zip_bytes(files):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


MODEL_FILES = {"app/model/config.json": b'{"a": 1}', "app/model/1_Pooling/config.json": b"{}",
               "app/model/model.safetensors": np.random.default_rng(1).bytes(50_000), "app/other.txt": b"no"}


def test_a_split_zip_folder_is_extracted(site, monkeypatch):
    archive = zip_bytes(MODEL_FILES)
    register(monkeypatch, site, "zipped", split(archive, (7, len(archive) // 2)), member="app/model/")
    folder = sources.join_parts("zipped")
    extracted = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert extracted == {k[len("app/model/"):]: v for k, v in MODEL_FILES.items() if k.startswith("app/model/")}


def test_a_split_zip_member_file_is_extracted(site, monkeypatch):
    archive = zip_bytes(MODEL_FILES)
    register(monkeypatch, site, "one", split(archive, (100,)), member="app/model/model.safetensors",
             file="model.safetensors")
    folder = sources.join_parts("one")
    assert [p.name for p in folder.iterdir()] == ["model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == MODEL_FILES["app/model/model.safetensors"]


def test_a_damaged_zip_member_is_refused(site, monkeypatch):
    archive = bytearray(zip_bytes({"m/weights.bin": b"x" * 1000}))
    archive[archive.index(b"PK\x01\x02") - 20] ^= 1  # a byte of compressed data; the joined hash is taken as is
    register(monkeypatch, site, "crc", split(bytes(archive), (30,)), member="m/weights.bin", file="weights.bin")
    with pytest.raises(LvaaError, match=r"^parts:crc: the zip joined from the parts of parts:crc is damaged"):
        sources.join_parts("crc")


def test_a_missing_zip_member_is_named(site, monkeypatch):
    register(monkeypatch, site, "nomember", split(zip_bytes(MODEL_FILES), (50,)), member="gpt4all/x.gguf",
             file="x.gguf")
    with pytest.raises(LvaaError, match=r"holds no 'gpt4all/x.gguf'"):
        sources.join_parts("nomember")


def test_a_conversion_runs_once_on_the_joined_file(site, monkeypatch):
    calls = []

    def convert(model_file, folder):
        calls.append(model_file.name)
        (folder / "config.json").write_bytes(model_file.read_bytes()[::-1])

    register(monkeypatch, site, "conv", [b"abc", b"def"], file="model.gguf", convert=convert)
    folder = sources.join_parts("conv")
    sources.join_parts("conv")
    assert calls == ["model.gguf"] and (folder / "config.json").read_bytes() == b"fedcba"
    assert sources.PARTS["conv"].gguf_file == ""  # a converted GGUF is a plain folder to the backends


def test_locate_a_parts_source(site, monkeypatch):
    register(monkeypatch, site, "loc", [b"gg", b"uf"], version="0.9.0", file="m.gguf")
    located = sources.locate(ModelSpec(source="parts:loc", kind="decoder", pooling="mean"))
    assert located == sources.Located(sources.parts_folder("loc"), "m.gguf", "0.9.0")
    assert sources.weight_files(located, "x") == [sources.parts_folder("loc") / "m.gguf"]
    with pytest.raises(LvaaError, match="^embed.models.x: 'parts:loc' ships m.gguf, not gguf_file='n.gguf'$"):
        sources.locate(ModelSpec(source="parts:loc", kind="decoder", pooling="mean", gguf_file="n.gguf", name="x"))
    with pytest.raises(LvaaError, match="^embed.models.x: revision applies to hub ids, not to 'parts:loc'$"):
        sources.locate(ModelSpec(source="parts:loc", kind="decoder", pooling="mean", revision="main", name="x"))
    with pytest.raises(LvaaError, match=r"^embed.models.x: unknown model parts 'parts:nope'; known: parts:qwen2.5"):
        sources.locate(ModelSpec(source="parts:nope", kind="decoder", pooling="mean", name="x"))


def test_joined_parts_read_and_seek_across_boundaries(tmp_path):
    chunks = [b"abc", b"", b"defg", b"h"]
    paths = []
    for i, chunk in enumerate(chunks):
        paths.append(tmp_path / f"p{i}")
        paths[-1].write_bytes(chunk)
    with sources.JoinedParts(paths) as joined:
        assert joined.size == 8 and joined.read() == b"abcdefgh"
        joined.seek(2)
        assert joined.read(3) == b"cde" and joined.tell() == 5
        joined.seek(-2, io.SEEK_END)
        assert joined.read(10) == b"gh" and joined.read(1) == b""


def test_the_registry_is_consistent():
    for name, entry in sources.PARTS.items():
        assert len(entry.sha256) == 64 and entry.size > 0 and entry.distributions, name
        assert entry.file or entry.member.endswith("/"), name  # a model file, or an extracted folder
        assert not entry.member or entry.member.endswith("/") or entry.member.endswith(entry.file), name


def test_extras_pin_the_registry_versions():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(sources.PARTS["qwen2.5-coder-0.5b-instruct-q4_k_m"].pins) <= set(extras["hf"])
    assert extras["wide"] == sources.PARTS["qwen2.5-coder-1.5b-instruct-q4_k_m"].pins
