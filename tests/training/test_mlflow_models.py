"""Training logs its bundle as MLflow models, ``--register`` adds registry versions, and ``segapp infer``
runs ``runs:/`` and ``models:/`` URIs fetched from a real ``mlflow server`` on loopback, exactly as ``--run``."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import mlflow.pyfunc
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import SAMPLE_MANIFEST, TINY, free_port
from mlflow.tracking import MlflowClient

from app.bundle import mlflow_source
from app.bundle.model import load_model
from app.bundle.trust import bundle_digest, trust_file
from app.cli import main
from app.errors import ConfigError

BUNDLE = "hippocampus_unet3d"
IMAGE = SAMPLE_MANIFEST.parent / "imagesTr" / "hippocampus_003.nii.gz"


def _train(out: Path, server: str, name: str, capsys) -> tuple[str, str]:
    """One tiny epoch through the CLI; returns (run id, the registry line it printed)."""
    argv = ["train", BUNDLE, "--manifest", str(SAMPLE_MANIFEST), "--epochs", "1", "--device", "cpu"]
    argv += ["--out", str(out), "--tracking-uri", server, "--register", name, "--config", "demo.json"]
    assert main([*argv, "--override", json.dumps(TINY)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("registry:"))
    return json.loads((out / "mlflow_run.json").read_text())["run_id"], line


def _infer(bundle_args: list[str], out: Path, capsys) -> np.ndarray:
    rc = main(["infer", *bundle_args, "--input", str(IMAGE), "--output", str(out), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    (seg,) = out.glob("*_seg.nii.gz")
    return np.asarray(nib.load(seg).dataobj)


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_trained_models_logged_registered_and_fetched_for_inference(tmp_path, mlflow_server, capsys, monkeypatch):
    name = f"hippo-{time.time_ns()}"  # the server is shared by the session's tests
    run_dir = tmp_path / "run"
    run_id, line = _train(run_dir, mlflow_server, name, capsys)
    assert line.startswith(f"registry:   models:/{name}/1 (from runs:/{run_id}/model)")
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)

    # both models are logged for the run, as pyfunc models whose data is the run's bundle
    run = client.get_run(run_id)
    logged = {m.name: m for m in client.search_logged_models([run.info.experiment_id]) if m.source_run_id == run_id}
    assert set(logged) == {"model", "best_model"}
    for model_name, weights in (("model", "models/model.pt"), ("best_model", "models/best.pt")):
        with mlflow_source.tracking(mlflow_server):  # MLflow resolves models:/ with its global registry URI
            local = Path(mlflow.artifacts.download_artifacts(
                f"models:/{logged[model_name].model_id}", dst_path=str(tmp_path / model_name)
            ))  # fmt: skip
        spec = yaml.safe_load((local / "MLmodel").read_text())
        pyfunc = spec["flavors"]["python_function"]
        assert pyfunc["loader_module"] == "app.bundle.mlflow_source"
        bundle = local / pyfunc["data"]
        assert {p.name for p in (bundle / "configs").iterdir()} == {"inference.json", "evaluate.json", "metadata.json"}
        for cfg in ("inference.json", "evaluate.json", "metadata.json"):
            assert (bundle / "configs" / cfg).read_bytes() == (run_dir / "configs" / cfg).read_bytes()
        got, want = _state(bundle / "models" / "model.pt"), _state(run_dir / weights)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        inputs = json.loads(spec["signature"]["inputs"])
        assert inputs[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 1, -1, -1, -1]}
        example = json.loads((local / spec["saved_input_example_info"]["artifact_path"]).read_text())
        assert np.asarray(example).shape == (1, 1, 16, 16, 16)  # metadata's "16*n" with n = 1

    # the registry's version names its source run; a second training adds version 2
    v1 = client.get_model_version(name, "1")
    assert v1.run_id == run_id and v1.source == f"models:/{logged['model'].model_id}"
    run2_id, line2 = _train(tmp_path / "run2", mlflow_server, name, capsys)
    assert line2.startswith(f"registry:   models:/{name}/2 (from runs:/{run2_id}/model)")
    assert client.get_model_version(name, "2").run_id == run2_id != run_id

    # inference from the run folder, the run's model and the registered version: the same labels
    want = _infer([BUNDLE, "--run", str(run_dir)], tmp_path / "by_run", capsys)
    assert len(np.unique(want)) > 1  # the untrained network still labels something: a real comparison
    by_run_uri = _infer([f"runs:/{run_id}/model", "--tracking-uri", mlflow_server], tmp_path / "by_runs_uri", capsys)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    by_version = _infer([f"models:/{name}/1"], tmp_path / "by_models_uri", capsys)
    assert np.array_equal(by_run_uri, want) and np.array_equal(by_version, want)
    by_alias_latest = _infer([f"models:/{name}/latest"], tmp_path / "by_latest", capsys)  # version 2: another run
    assert by_alias_latest.shape == want.shape

    # on a machine that has not seen these runs (its own trust records and bundle store): fetched into the
    # store's cache and recorded as trusted there, then used again without a new download
    monkeypatch.setenv("SEGAPP_HOME", str(tmp_path / "other_home"))
    monkeypatch.setenv("SEGAPP_BUNDLES", str(tmp_path / "other_store"))
    fetched = mlflow_source.fetch_mlflow_bundle(f"models:/{name}/1")
    assert fetched.is_relative_to(tmp_path / "other_store" / ".mlflow")
    source = json.loads((fetched.parent.parent / mlflow_source.SOURCE_FILE).read_text())
    assert source["resolved"] == f"models:/{name}/1" and source["tracking_uri"] == mlflow_server
    records = json.loads(trust_file().read_text())
    assert trust_file().is_relative_to(tmp_path / "other_home")
    assert records[bundle_digest(fetched)]["reason"] == f"fetched from MLflow models:/{name}/1 ({mlflow_server})"
    assert np.array_equal(_infer([str(fetched)], tmp_path / "by_fetched", capsys), want)
    assert mlflow_source.fetch_mlflow_bundle(f"models:/{name}/1") == fetched
    assert json.loads((fetched.parent.parent / mlflow_source.SOURCE_FILE).read_text())["fetched"] == source["fetched"]
    # an edited cached copy is not trusted again
    cfg = fetched / "configs" / "inference.json"
    cfg.write_text(cfg.read_text().replace('"sw_batch_size": 4', '"sw_batch_size": 2'))
    with pytest.raises(ConfigError, match="Python code"):
        load_model(f"models:/{name}/1", device="cpu")

    # the pyfunc model runs the bundle's inferer on network-space input
    pyfunc_model = mlflow.pyfunc.load_model(f"models:/{name}/2")
    x = np.random.default_rng(1).standard_normal((1, 1, 24, 24, 24), dtype=np.float32)
    labels = pyfunc_model.predict(x)
    m = load_model(run=tmp_path / "run2", device="cpu")
    with torch.no_grad():
        expected = m.inferer(torch.from_numpy(x), m.network).argmax(1).numpy()
    assert labels.dtype == np.uint8 and np.array_equal(labels, expected)

    # a version that does not exist: one line naming the URI
    capsys.readouterr()
    assert main(["infer", f"models:/{name}/99", "--input", str(IMAGE), "--output", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"models:/{name}/99" in err and "not found" in err


def test_dead_tracking_uri_or_none_is_one_line(tmp_path, capsys, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    argv = ["infer", "models:/hippo/1", "--input", str(IMAGE), "--output", str(tmp_path / "out")]
    assert main([*argv, "--tracking-uri", dead]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach the MLflow tracking server" in err and dead in err
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tracking-uri" in err
    assert main([*argv[:1], "runs:/only-an-id", *argv[2:], "--tracking-uri", dead]) != 0
    assert "runs:/RUN_ID/ARTIFACT_PATH" in capsys.readouterr().err
    missing = tmp_path / "none.db"
    assert main([*argv, "--tracking-uri", f"sqlite:///{missing}"]) != 0
    assert "no MLflow database" in capsys.readouterr().err and not missing.exists()
    assert not (tmp_path / "out").exists()


def test_tracking_uris_lose_their_credentials():
    assert mlflow_source.redact("https://ann:secret@mlflow.example:5000/x") == "https://mlflow.example:5000/x"
    assert mlflow_source.redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    err = mlflow_source._mlflow_error(
        RuntimeError("API request to https://ann:secret@h/api failed: Max retries exceeded"),
        "models:/a/1",
        "https://ann:secret@h",
    )
    assert "secret" not in str(err) and "cannot reach" in str(err)


def test_a_model_whose_data_path_leaves_its_folder_is_refused(tmp_path):
    (tmp_path / "outside" / "configs").mkdir(parents=True)
    (tmp_path / "outside" / "configs" / "metadata.json").write_text("{}")
    model = tmp_path / "model"
    model.mkdir()
    (model / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {"data": "../outside"}}}))
    with pytest.raises(ConfigError, match="leaves the model's folder"):
        mlflow_source._bundle_in(model)
    (model / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {"data": "data/bundle"}}}))
    with pytest.raises(ConfigError, match="not a segapp bundle model"):
        mlflow_source._bundle_in(model)
    shutil.copytree(tmp_path / "outside", model / "data" / "bundle")
    assert mlflow_source._bundle_in(model) == model / "data" / "bundle"
