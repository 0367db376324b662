"""The trust records under concurrent writers: parallel training folds record their run folders at once."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

from app.bundle.trust import is_recorded, trust_bundle, trust_file

WRITERS, FOLDERS_EACH = 6, 5


def _bundle(root: Path, n: int) -> Path:
    folder = root / f"b{n}"
    (folder / "configs").mkdir(parents=True)
    (folder / "configs" / "inference.json").write_text(json.dumps({"imports": ["$import glob"], "n": n}))
    return folder


def _trust_all(folders: list[str], start) -> None:
    start.wait()  # forked: SEGAPP_HOME as the test set it
    for folder in folders:
        trust_bundle(folder, reason="test")


def test_parallel_writers_lose_no_record(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGAPP_HOME", str(tmp_path / "home"))
    folders = [_bundle(tmp_path, n) for n in range(WRITERS * FOLDERS_EACH)]
    ctx = mp.get_context("fork")
    start = ctx.Barrier(WRITERS)
    procs = [
        ctx.Process(target=_trust_all, args=([str(f) for f in folders[w::WRITERS]], start)) for w in range(WRITERS)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    records = json.loads(trust_file().read_text())
    assert len(records) == len(folders)
    assert all(is_recorded(f) for f in folders)
