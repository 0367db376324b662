"""Multi-process training: ``segapp train --nproc N`` re-runs itself under ``torchrun``.

One machine::

    segapp train hippocampus_unet3d --nproc 4          # = torchrun --standalone --nproc_per_node 4 -m app.cli train ...

Several machines (run on each node, same arguments; node 0's address as the rendezvous endpoint)::

    torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint node0:29400 --rdzv_id run1 \\
        -m app.cli train hippocampus_unet3d --config multi_gpu_train.json --out /shared/runs/hippo

The bundle's ``multi_gpu_train.json`` overlay wraps the network in DistributedDataParallel; the CLI's
``--nproc`` adds it by itself. ``BatchRecorder`` is a debugging aid that the overlay attaches: with
``SEGAPP_RECORD_BATCHES=DIR`` set, each rank writes the case ids it trained on per epoch and a
checksum of its final weights to ``DIR/rank<r>.json`` (case ids come from the manifest, never from
image headers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from app.errors import ConfigError
from app.io.atomic import atomic_write_text
from app.runtime.distributed import unwrap

log = logging.getLogger(__name__)

RECORD_ENV = "SEGAPP_RECORD_BATCHES"


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def torchrun_command(argv: Sequence[str], nproc: int, module: str = "app.cli") -> list[str]:
    """The ``torchrun --standalone`` command line that runs ``python -m <module> <argv>`` in ``nproc`` processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(int(nproc)),
        "-m",
        module,
        *argv,
    ]


def _check_nproc(argv: Sequence[str], nproc: int) -> None:
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}", "--nproc")
    device = "auto"
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            device = argv[i + 1]
        elif arg.startswith("--device="):
            device = arg.split("=", 1)[1]
    device = device.strip().lower()
    if device.startswith("cuda:"):
        raise ConfigError(
            "with --nproc each process takes the GPU of its LOCAL_RANK: use --device cuda or auto", "--device"
        )
    if torch.cuda.is_available() and device in ("auto", "cuda") and nproc > torch.cuda.device_count():
        raise ConfigError(f"--nproc {nproc} but only {torch.cuda.device_count()} CUDA device(s) here", "--nproc")


def launch_torchrun(argv: Sequence[str], nproc: int) -> int:
    """Run ``segapp <argv>`` in ``nproc`` local processes with ``torchrun --standalone``; return its exit code.

    Args:
        argv: the segapp arguments each process gets (without ``--nproc``; the caller adds the bundle's
            ``--config multi_gpu_train.json``).
        nproc: processes on this machine (one per GPU; on CPU they use gloo).
    """
    _check_nproc(argv, nproc)
    cmd = torchrun_command(argv, nproc)
    log.info("launching %d processes: %s", nproc, " ".join(cmd[1:]))
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:  # torchrun forwards the signal to its workers
        return 130


# -- debugging aid: which cases did each rank see ---------------------------------------------------------
def weights_sha256(network: torch.nn.Module) -> str:
    """SHA-256 over the network's state dict (names and raw bytes, in order), DDP wrapper removed."""
    h = hashlib.sha256()
    for name, tensor in unwrap(network).state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _batch_ids(batch) -> list[str]:
    items = batch if isinstance(batch, list) else [batch]
    ids: list[str] = []
    for item in items:
        value = item.get("id") if isinstance(item, dict) else None
        if isinstance(value, (list, tuple)):
            ids.extend(str(v) for v in value)
        elif value is not None:
            ids.append(str(value))
    return ids


class BatchRecorder:
    """Ignite handler: with ``SEGAPP_RECORD_BATCHES=DIR``, record what this rank trained on.

    ``DIR/rank<r>.json`` holds ``{"rank", "world_size", "epochs": {"<epoch>": [case ids...]},
    "weights_sha256": <final weights>}``; a resumed run adds its epochs to the file. Without the
    variable (or ``path``) the handler attaches nothing.

    Args:
        rank, world_size: this process' DDP rank and the number of processes.
        path: the folder (default: the environment variable).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, path: str | None = None):
        self.rank, self.world_size = int(rank), int(world_size)
        folder = path or os.environ.get(RECORD_ENV, "")
        self.file = Path(folder) / f"rank{self.rank}.json" if folder else None
        self.record: dict = {"rank": self.rank, "world_size": self.world_size, "epochs": {}, "weights_sha256": None}
        if self.file is not None and self.file.is_file():
            self.record.update(json.loads(self.file.read_text()))

    def attach(self, engine: Engine) -> None:
        if self.file is None:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._batch)  # still the collated batch here
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _epoch_started(self, engine: Engine) -> None:
        self.record["epochs"][str(engine.state.epoch)] = []

    def _batch(self, engine: Engine) -> None:
        self.record["epochs"][str(engine.state.epoch)].extend(_batch_ids(engine.state.batch))

    def _write(self, engine: Engine) -> None:
        if self.file is not None:
            atomic_write_text(self.file, json.dumps(self.record, indent=1))

    def _completed(self, engine: Engine) -> None:
        self.record["weights_sha256"] = weights_sha256(engine.network)  # type: ignore[attr-defined]  # SupervisedTrainer
        self._write(engine)
