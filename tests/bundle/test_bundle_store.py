"""The bundle store and MONAI's bundle checks: ``segapp bundle download | list | verify``.

A real HTTP server on loopback (the standard library's, in a thread) serves bundle zips in the model
zoo's layout (``NAME/configs/...`` at the top of the zip); the download goes through
``monai.bundle.download`` as it would from the zoo's hosting.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO
from zoo_bundles import SPLEEN, copy_spleen, small_spleen, write_json

from app.cli import main

SAMPLE = REPO / "bundles" / "hippocampus_unet3d" / "sample" / "hippocampus_003.nii.gz"
NAME = "spleen_ct_segmentation"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture()
def server(tmp_path):
    """(folder served, base URL) of a loopback HTTP server."""
    www = tmp_path / "www"
    www.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture()
def store(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "store"
    monkeypatch.setenv("SEGAPP_BUNDLES", str(path))
    return path


def _zip(folder: Path, out: Path, top: str) -> Path:
    """``folder``'s files under ``top/`` in a zip (the model zoo's release layout)."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f"{top}/{f.relative_to(folder).as_posix()}")
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("segapp: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _store_is_empty(store: Path) -> bool:
    return not store.exists() or not any(store.iterdir())


def test_download_lands_in_the_store_trusted_listed_and_runs_by_name(tmp_path, server, store, capsys):
    www, url = server
    zipped = _zip(small_spleen(tmp_path / "build" / NAME), www / f"{NAME}_v0.5.9.zip", NAME)
    digest = hashlib.sha256(zipped.read_bytes()).hexdigest()
    assert main(["bundle", "download", NAME, "--url", f"{url}/{zipped.name}", "--sha256", digest]) == 0
    out = capsys.readouterr().out
    assert str(store / NAME) in out and "SHA-256 checked" in out
    assert (store / NAME / "configs" / "inference.json").is_file()
    assert (store / NAME / "models" / "model.pt").is_file()
    assert [p.name for p in store.iterdir()] == [NAME]  # no temporary folder or zip left

    assert main(["bundle", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[NAME]["source"] == "store" and rows[NAME]["version"] == "0.5.9"
    assert Path(rows[NAME]["path"]) == (store / NAME).resolve()
    assert rows["hippocampus_unet3d"]["source"] == "shipped"

    # found by name and trusted by the download: its $ expressions run without --trust-bundle
    out = tmp_path / "out"
    assert main(["infer", NAME, "--input", str(SAMPLE), "--output", str(out), "--device", "cpu"]) == 0
    assert list(out.glob("*_seg.nii.gz"))


@pytest.mark.parametrize("case", ["missing", "not_a_zip", "no_bundle", "wrong_name", "bad_sha256"])
def test_a_bad_download_is_one_line_and_leaves_nothing(tmp_path, server, store, capsys, case):
    www, url = server
    extra = []
    if case == "bad_sha256":  # a good bundle, but not the zip the user expected
        _zip(SPLEEN, www / "b.zip", NAME)
        extra = ["--sha256", "0" * 64]
    if case == "not_a_zip":
        (www / "b.zip").write_text("<html>not found</html>")
    elif case == "no_bundle":  # a zip of something else
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "readme.txt").write_text("hello")
        _zip(tmp_path / "junk", www / "b.zip", NAME)
    elif case == "wrong_name":  # a real bundle, under another top folder than the name asked for
        _zip(SPLEEN, www / "b.zip", "other_bundle")
    assert main(["bundle", "download", NAME, "--url", f"{url}/b.zip", *extra]) == 2
    line = _error_line(capsys)
    assert f"{url}/b.zip" in line
    if case == "bad_sha256":
        digest = hashlib.sha256((www / "b.zip").read_bytes()).hexdigest()
        assert f"SHA-256 is {digest}, not {'0' * 64}" in line
    elif case == "missing":
        assert "bundle download failed" in line and "404" in line
    elif case == "not_a_zip":
        assert "bundle download failed" in line
    else:
        assert "no bundle folder" in line and "configs/metadata.json" in line
    assert _store_is_empty(store)
    assert main(["bundle", "list", "--json"]) == 0
    assert NAME not in {r["name"] for r in json.loads(capsys.readouterr().out)}


def test_a_failed_download_keeps_the_bundle_already_in_the_store(tmp_path, server, store, capsys):
    www, url = server
    _zip(small_spleen(tmp_path / "build" / NAME), www / "good.zip", NAME)
    assert main(["bundle", "download", NAME, "--url", f"{url}/good.zip"]) == 0
    before = (store / NAME / "configs" / "inference.json").read_bytes()
    assert main(["bundle", "download", NAME, "--url", f"{url}/gone.zip"]) == 2
    _error_line(capsys)
    assert (store / NAME / "configs" / "inference.json").read_bytes() == before
    assert sorted(p.name for p in store.iterdir()) == [NAME]


# -- verify ---------------------------------------------------------------------------------------------
def test_verify_a_shipped_bundle(capsys):
    assert main(["bundle", "verify", "hippocampus_unet3d"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("verify_metadata: OK") and out[1].startswith("verify_net_in_out network_def: OK")


def test_verify_the_zoo_spleen_bundle(tmp_path, capsys):
    """The zoo's metadata follows meta_schema_20220324 (``optional_packages_version``)."""
    root = copy_spleen(tmp_path / NAME)
    assert main(["bundle", "verify", str(root), "--trust-bundle"]) == 0
    assert capsys.readouterr().out.count(": OK") == 2


@pytest.mark.parametrize("broken", ["metadata", "channels"])
def test_verify_a_broken_copy_names_the_check_and_the_file(tmp_path, capsys, broken):
    root = tmp_path / NAME
    shutil.copytree(SPLEEN, root)
    meta_file = root / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    if broken == "metadata":
        del meta["network_data_format"]
    else:  # the metadata promises 3 output channels; the network gives 2
        meta["network_data_format"]["outputs"]["pred"]["num_channels"] = 3
    write_json(meta_file, meta)
    assert main(["bundle", "verify", str(root), "--trust-bundle"]) == 2
    line = _error_line(capsys)
    if broken == "metadata":
        assert str(meta_file) in line and "does not follow the bundle schema" in line
        assert "network_data_format" in line
    else:
        assert str(root / "configs" / "inference.json") in line and "verify_net_in_out failed" in line


def test_a_zip_with_paths_out_of_its_folder_is_refused(tmp_path, server, store, capsys):
    """``../`` entries (zip slip) next to a real bundle: MONAI's extraction refuses the archive."""
    www, url = server
    zipped = _zip(small_spleen(tmp_path / "build" / NAME), www / "b.zip", NAME)
    target = store.parent / "escaped.txt"
    with zipfile.ZipFile(zipped, "a") as z:
        z.writestr("../escaped.txt", "x")
    assert main(["bundle", "download", NAME, "--url", f"{url}/b.zip"]) == 2
    assert "Unsafe path" in _error_line(capsys)
    assert not target.exists() and _store_is_empty(store)


def test_the_store_defaults_to_the_users_cache_folder(tmp_path, monkeypatch):
    from app.bundle.store import store_dir

    monkeypatch.delenv("SEGAPP_BUNDLES", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert store_dir() == tmp_path / ".cache" / "segapp" / "bundles"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert store_dir() == tmp_path / "xdg" / "segapp" / "bundles"
    monkeypatch.setenv("SEGAPP_BUNDLES", str(tmp_path / "mine"))
    assert store_dir() == tmp_path / "mine"
