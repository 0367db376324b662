"""The installable package: an sdist and a wheel built from it carry the shipped bundles (with the bundle
schema) and the sample data, and an installed wheel runs ``segapp`` from outside the checkout.

The wheel goes into a fresh virtual environment made with ``--without-pip`` and installed with
``--no-deps`` by this interpreter's pip (``pip --python``), so nothing is downloaded. The dependencies
come from this interpreter's site-packages through a ``.pth`` line in the fresh environment: such a
line only appends the folder to ``sys.path`` (the ``.pth`` files inside it, among them the editable
install of this checkout, are not run), and it comes after the fresh environment's own site-packages,
so ``app`` is imported from the wheel. ``--system-site-packages`` would not do: it exposes the base
interpreter's site, where the dependencies are not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO
from runs import tiny_run

from app.cli import main

# what a build needs from the checkout
SOURCES = ("app", "bundles", "sample_data", "setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md")
SHIPPED = {"bundles": "app/_shipped/bundles", "sample_data": "app/_shipped/sample_data"}
SAMPLE = "app/_shipped/bundles/hippocampus_unet3d/sample/hippocampus_003.nii.gz"


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _shipped_files() -> set[str]:
    """The files the wheel must carry: every file of bundles/ and sample_data/, at its wheel path."""
    return {
        f"{SHIPPED[top]}/{p.relative_to(REPO / top).as_posix()}"
        for top in SHIPPED
        for p in (REPO / top).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of what a build needs from the checkout (the builds then leave nothing in the checkout)."""
    src = tmp_path_factory.mktemp("source") / "segapp"
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    return src


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    """sdist, then a wheel from the unpacked sdist (``python -m build``), offline: no build isolation."""
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)], dist, os.environ)
    (whl,) = dist.glob("segapp-*.whl")
    (sdist,) = dist.glob("segapp-*.tar.gz")
    print(f"wheel {whl.name}: {whl.stat().st_size / 2**20:.2f} MiB; sdist {sdist.stat().st_size / 2**20:.2f} MiB")
    return whl


def _venv_with(target: str, folder: Path, *pip_options: str) -> tuple[Path, Path, dict]:
    """A fresh venv with ``target`` installed (``--no-deps``) and this interpreter's packages on a ``.pth``
    line; returns (its python, its site-packages, an environment without PYTHONPATH that runs it)."""
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    (site / "_segapp_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index"]
    _run([*pip, *pip_options, target], folder, env)
    return py, site, env


def _where(py: Path, cwd: Path, env: dict) -> dict:
    code = (
        "import json, app, app.resources as r; from app.bundle.verify import SCHEMA; "
        "print(json.dumps({'app': app.__file__, 'bundles': str(r.BUNDLES_DIR), 'manifest': r.sample_manifest(), "
        "'schema': str(SCHEMA)}))"
    )
    return json.loads(_run([str(py), "-c", code], cwd, env).stdout)


def test_wheel_carries_bundles_schema_and_sample_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = _shipped_files() - names
    assert not missing, f"{len(missing)} shipped files not in the wheel, e.g. {sorted(missing)[:5]}"
    assert "app/_shipped/bundles/schema/meta_schema.json" in names
    assert "app/_shipped/sample_data/hippocampus/manifest.json" in names
    assert {n.split("/")[0] for n in names} == {"app", wheel.name.split("-py3")[0] + ".dist-info"}
    assert not any(n.endswith(".pyc") or "/tests/" in n for n in names)


@pytest.mark.slow
def test_installed_wheel_runs_segapp_outside_the_checkout(wheel, tmp_path):
    py, site, env = _venv_with(str(wheel), tmp_path)
    work = tmp_path / "work"  # outside the checkout: nothing resolves relative to it
    work.mkdir()
    segapp = str(py.parent / "segapp")

    where = _where(py, work, env)
    assert Path(where["app"]).is_relative_to(site), where
    assert Path(where["bundles"]) == site / SHIPPED["bundles"]
    assert Path(where["manifest"]).is_file() and Path(where["manifest"]).is_relative_to(site)
    assert Path(where["schema"]).is_file() and Path(where["schema"]).is_relative_to(site)

    rows = json.loads(_run([segapp, "bundle", "list", "--json"], work, env).stdout)
    shipped = {r["name"]: Path(r["path"]) for r in rows if r["source"] == "shipped"}
    assert set(shipped) == {p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file()}
    assert all(p.is_relative_to(site / SHIPPED["bundles"]) for p in shipped.values()), shipped
    assert not any(p.is_relative_to(REPO) for p in shipped.values())

    verified = _run([segapp, "bundle", "verify", "hippocampus_unet3d"], work, env).stdout
    assert "verify_metadata: OK" in verified and str(site) in verified  # the schema and metadata of the wheel

    run = tiny_run(tmp_path / "run")  # trust recorded in this session's SEGAPP_HOME, which the subprocess shares
    image = site / SAMPLE
    _run([segapp, "infer", "hippocampus_unet3d", "--run", str(run), "--input", str(image), "--output", "out",
          "--device", "cpu"], work, env)  # fmt: skip
    (seg,) = (work / "out").glob("*_seg.nii.gz")
    out, src = nib.load(seg), nib.load(image)
    assert out.shape == src.shape and np.allclose(out.affine, src.affine)
    labels = np.asarray(out.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2}

    # the checkout's segapp gives the same segmentation
    assert main(["infer", "hippocampus_unet3d", "--run", str(run), "--input", str(image),
                 "--output", str(tmp_path / "checkout"), "--device", "cpu"]) == 0  # fmt: skip
    assert np.array_equal(labels, np.asarray(nib.load(tmp_path / "checkout" / seg.name).dataobj))


@pytest.mark.slow
def test_pip_install_dot_is_complete(source, tmp_path):
    """``pip install .`` (not editable: pip builds the wheel from the tree itself, not from an sdist)."""
    py, site, env = _venv_with(str(source), tmp_path, "--no-build-isolation")
    where = _where(py, tmp_path, env)
    assert Path(where["app"]).is_relative_to(site) and Path(where["schema"]).is_file()
    installed = {p.relative_to(site).as_posix() for p in (site / "app" / "_shipped").rglob("*") if p.is_file()}
    assert installed == _shipped_files()
    rows = json.loads(_run([str(py.parent / "segapp"), "bundle", "list", "--json"], tmp_path, env).stdout)
    assert rows and all(Path(r["path"]).is_relative_to(site) for r in rows if r["source"] == "shipped")
