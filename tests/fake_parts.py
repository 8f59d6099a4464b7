"""Fake part packages for tests: real minimal ``*.dist-info`` folders on a temporary sys.path, registered
as ``parts:<name>`` sources (nothing is downloaded)."""

import hashlib

from lvaa_jax.embeddings import sources


def install_fake(site, dist, version, files):
    """A minimal installed distribution: ``files`` (path -> bytes) under ``site`` and a dist-info that lists them."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    for path, data in files.items():
        (site / path).parent.mkdir(parents=True, exist_ok=True)
        (site / path).write_bytes(data)
    (info / "RECORD").write_text("".join(f"{path},,\n" for path in files) + f"{info.name}/METADATA,,\n")


def part_files(dist, index, data):
    """A fake part package's files: its part (in a hyphenated folder, as all-mpnet-base-v2's) and a module."""
    return {f"{dist}-files/input/model.bin.{index:03d}": data, f"{dist}-files/__init__.py": b""}


def split(data, cuts):
    return [data[a:b] for a, b in zip((0, *cuts), (*cuts, len(data)), strict=True)]


def make_site(tmp_path, monkeypatch):
    """A folder first on sys.path to install fake distributions into, and a private cache to join them
    into (for this test only)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    return folder


def register(monkeypatch, site, name, parts, *, version="1.0", skip=(), **entry):
    """Installs ``parts`` as packages fake-NAME-part-1..n (hyphenated folders, as all-mpnet-base-v2's) and
    registers ``parts:NAME``; the indices in ``skip`` are left uninstalled."""
    dists = tuple(f"fake-{name}-part-{i}" for i in range(1, len(parts) + 1))
    for i, (dist, data) in enumerate(zip(dists, parts, strict=True)):
        if i not in skip:
            install_fake(site, dist, version, part_files(dist, i, data))
    joined = b"".join(parts)
    fields = dict(size=len(joined), sha256=hashlib.sha256(joined).hexdigest()) | entry
    monkeypatch.setitem(sources.PARTS, name, sources.PartsModel(
        distributions=dists, version=version, part_glob="*/input/model.bin.*", **fields))
    return joined
