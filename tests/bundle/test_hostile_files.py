"""Hostile files are refused in one line and nothing in them runs; segapp's own files stay loadable.

Each payload would create a marker file if it ran; every test asserts the marker does not exist
afterwards (and, where the payload is meant to run once trusted, that it does then: so the payload is
live and the check is what stopped it).

* a pickle checkpoint whose unpickling calls ``open(MARKER, "w")``: ``weights_only=True`` refuses it;
* an ``executed_config.json`` (and a ``configs/`` folder) with ``$`` code next to a checkpoint: never read;
* an untrusted bundle folder with ``$`` code (the model zoo's spleen bundle, plus a payload): refused
  naming the file and the trust command; ``segapp bundle trust`` then runs it; an edited config is
  untrusted again; ``--trust-bundle`` runs it once without recording trust.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO
from runs import tiny_run
from zoo_bundles import copy_spleen, seeded_weights

from app.bundle.config import bundle_parser
from app.bundle.weights import load_checkpoint, load_network_weights
from app.cli import main
from app.errors import InputError

SAMPLE = REPO / "bundles" / "hippocampus_unet3d" / "sample" / "hippocampus_003.nii.gz"


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("segapp: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _infer(*args: str) -> int:
    return main(["infer", *args, "--input", str(SAMPLE), "--device", "cpu"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("run") / "run")


# -- pickles ------------------------------------------------------------------------------------------
def test_a_pickle_that_runs_code_is_refused_before_it_runs(tmp_path, run_dir, capsys):
    marker = tmp_path / "pwned"
    state = torch.load(run_dir / "models" / "model.pt", weights_only=True)
    evil = tmp_path / "evil.pt"
    torch.save({"network": state, "extra": _Payload(marker)}, evil)
    # the payload is live: a plain unpickler runs it
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()

    out = tmp_path / "out"
    assert _infer("--run", str(run_dir), "--checkpoint", str(evil), "--output", str(out)) != 0
    line = _error_line(capsys)
    assert str(evil) in line and "refusing to load" in line and "could run code" in line
    assert not marker.exists()
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(InputError, match="refusing to load"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_a_torchscript_archive_is_refused_with_a_hint(tmp_path, run_dir):
    net = bundle_parser(run_dir, ["inference"]).get_parsed_content("network_def").eval()
    ts = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(net), ts)
    with pytest.raises(InputError, match="TorchScript archive"):
        load_network_weights(net, ts)


def test_segapps_own_checkpoints_and_plain_state_dicts_load(tmp_path, run_dir):
    """models/model.pt (a plain state dict) and checkpoints/last.pt as the trainer writes it (network,
    optimizer, scheduler, history, RNG state), by the trainer's own checkpointer."""
    from app.training.checkpoint import RunCheckpointer

    network = bundle_parser(run_dir, ["inference"]).get_parsed_content("network_def")
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)  # the bundle's train.json optimizer
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2)
    network(torch.rand(1, 1, 16, 16, 16)).sum().backward()
    optimizer.step()  # an optimizer state with moments, as after a real epoch
    scheduler.step()
    saver = RunCheckpointer(str(tmp_path / "train"), network, optimizer, scheduler)
    saver.save(SimpleNamespace(state=SimpleNamespace(epoch=1, iteration=4, metrics={"loss": 0.7})))
    saver.finish(None)
    last = tmp_path / "train" / "checkpoints" / "last.pt"
    assert set(load_checkpoint(last)) >= {"network", "optimizer", "lr_scheduler", "history", "rng"}
    for n, ckpt in enumerate((last, tmp_path / "train" / "models" / "model.pt", run_dir / "models" / "model.pt")):
        out = tmp_path / f"out{n}"
        assert _infer("--run", str(run_dir), "--checkpoint", str(ckpt), "--output", str(out)) == 0
        assert list(out.glob("*_seg.nii.gz"))


# -- configs next to a checkpoint ----------------------------------------------------------------------
def test_executed_config_next_to_a_checkpoint_is_never_read(tmp_path, run_dir, capsys):
    marker = tmp_path / "pwned"
    folder = tmp_path / "downloaded"
    (folder / "configs").mkdir(parents=True)
    (folder / "model.pt").write_bytes((run_dir / "models" / "model.pt").read_bytes())
    code = f"$open({str(marker)!r}, 'w').close()"
    for name in ("executed_config.json", "configs/inference.json", "configs/metadata.json"):
        (folder / name).write_text(json.dumps({"network_def": code, "preprocessing": code, "labels": code}))
    out = tmp_path / "out"
    rc = _infer("hippocampus_unet3d", "--override", json.dumps({"features": [4, 8]}), "--checkpoint",
                str(folder / "model.pt"), "--output", str(out))  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert list(out.glob("*_seg.nii.gz"))
    assert not marker.exists()


# -- untrusted bundle folders ---------------------------------------------------------------------------
@pytest.fixture()
def zoo_copy(tmp_path) -> tuple[Path, Path]:
    """The zoo's spleen bundle, its network_def carrying a payload that creates a marker when evaluated."""
    root = copy_spleen(tmp_path / "spleen_ct_segmentation")
    marker = tmp_path / "ran"
    path = root / "configs" / "inference.json"
    cfg = json.loads(path.read_text())
    cfg["network_def"]["in_channels"] = f"$open({str(marker)!r}, 'a').close() or 1"
    path.write_text(json.dumps(cfg, indent=4) + "\n")
    seeded_weights(root, seed=0)  # builds network_def in this test (the payload runs once here)
    marker.unlink()
    return root, marker


def test_an_untrusted_bundle_runs_only_after_trust_and_again_after_an_edit(zoo_copy, tmp_path, capsys):
    root, marker = zoo_copy
    out = tmp_path / "out"
    assert _infer(str(root), "--output", str(out)) == 2
    line = _error_line(capsys)
    assert "untrusted bundle" in line and "nothing was run" in line
    assert f"{root}/configs/" in line  # names the file that holds code
    assert f"segapp bundle trust {root}" in line and "--trust-bundle" in line
    assert not marker.exists() and not out.exists()

    assert main(["bundle", "trust", str(root)]) == 0
    assert "trusted" in capsys.readouterr().out
    assert _infer(str(root), "--output", str(out)) == 0
    assert marker.exists() and list(out.glob("*_seg.nii.gz"))  # the bundle's code ran, once trusted

    marker.unlink()
    path = root / "configs" / "inference.json"
    cfg = json.loads(path.read_text())
    cfg["inferer"]["overlap"] = 0.25  # any edit of a config
    path.write_text(json.dumps(cfg, indent=4) + "\n")
    assert _infer(str(root), "--output", str(tmp_path / "out2")) == 2
    assert "untrusted bundle" in _error_line(capsys)
    assert not marker.exists()


def test_trust_bundle_flag_runs_once_without_recording(zoo_copy, tmp_path, capsys):
    root, marker = zoo_copy
    assert _infer(str(root), "--trust-bundle", "--output", str(tmp_path / "once")) == 0
    assert marker.exists()
    marker.unlink()
    assert _infer(str(root), "--output", str(tmp_path / "again")) == 2
    assert "untrusted bundle" in _error_line(capsys)
    assert not marker.exists()
