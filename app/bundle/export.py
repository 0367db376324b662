"""``segapp export``: a bundle's network with its weights as a TorchScript or ONNX file.

The network is built by :func:`app.bundle.model.load_model` (trust check, ``weights_only`` weights),
on the CPU, in eval mode. Only the network is exported: the bundle's preprocessing, sliding-window
inferer and postprocessing stay in its configs (which a TorchScript file carries along).

* **TorchScript** (MONAI's ``ckpt_export`` semantics, through ``monai.networks.utils.convert_to_torchscript``):
  ``torch.jit.script``, or ``torch.jit.trace`` on the example input when the network cannot be scripted;
  the file carries ``metadata.json`` and ``inference.json`` as extra files, as the model zoo's do.
* **ONNX**: torch's exporter (``torch.onnx.export(dynamo=True)``, which needs ``onnxscript``) with the
  batch and spatial axes dynamic (static when the network's code does not allow that), weights inside
  the file; the bundle's name, version and labels are in the model's ``metadata_props``. Needs the
  ``onnx`` extra (``pip install segapp[onnx]``).

The example input is ``(1, channels, *spatial)`` float32: ``spatial`` is the ``--shape`` given, else the
bundle inferer's ``roi_size`` (the patch the network sees in a sliding window), else the metadata's
``spatial_shape`` with ``n = p = 1`` (as MONAI's ``verify_net_in_out``). Every export is checked before
it replaces the output file: the written file is loaded back (``torch.jit.load`` or onnxruntime) and its
output on a seeded random input compared with the network's.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.bundle.model import LoadedModel, load_model
from app.errors import ConfigError
from app.io.atomic import atomic_path

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")
ONNX_IN_FILE_LIMIT = 1 << 31  # protobuf's 2 GiB: larger weights go to an external data file


@dataclass(frozen=True)
class ExportResult:
    """What was written and how well it matches the network.

    Attributes:
        path: the exported file.
        format: ``torchscript`` or ``onnx``.
        method: ``script`` or ``trace`` (TorchScript), ``dynamic`` or ``static`` shapes (ONNX).
        input_shape: the example input's shape (N, C, *spatial voxels).
        max_abs_diff: largest absolute difference between the file's and the network's outputs on a
            seeded random input of ``input_shape``.
    """

    path: Path
    format: str
    method: str
    input_shape: tuple[int, ...]
    max_abs_diff: float


def example_shape(model: LoadedModel, spatial: Sequence[int] | None = None) -> tuple[int, ...]:
    """``(1, channels, *spatial)`` of the example input (see the module docstring for the spatial size)."""
    from monai.bundle.scripts import _get_fake_spatial_shape  # MONAI's reading of "16*n" shapes

    image = ((model.metadata.get("network_data_format") or {}).get("inputs") or {}).get("image") or {}
    channels = int(image.get("num_channels", 1))
    if spatial is None:
        roi = getattr(model.inferer, "roi_size", None)
        if roi is not None and all(int(s) > 0 for s in roi):
            spatial = [int(s) for s in roi]
        elif image.get("spatial_shape"):
            spatial = list(_get_fake_spatial_shape(image["spatial_shape"], p=1, n=1, any=1))
        else:
            raise ConfigError(
                "no input size: the inferer has no roi_size and the metadata no spatial_shape; pass --shape",
                str(model.ref.root / "configs" / "metadata.json"),
            )
    spatial = [int(s) for s in spatial]
    if len(spatial) != 3 or any(s < 1 for s in spatial):
        raise ConfigError(f"the input size must be three positive voxel counts, got {spatial}", "--shape")
    return (1, channels, *spatial)


def require_onnx() -> None:
    """A ConfigError naming the extra when the ONNX packages are not installed."""
    missing = []
    for name in ONNX_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(
            f"ONNX export needs {', '.join(missing)}: pip install 'segapp[onnx]' "
            f"(or pip install {' '.join(ONNX_MODULES)})",
            "--format onnx",
        )


def _extra_files(model: LoadedModel) -> dict[str, bytes]:
    config = {k: v for k, v in model.parser.get().items() if k != "_meta_"}
    return {
        "metadata.json": json.dumps(model.metadata).encode(),
        "inference.json": json.dumps(config, default=str).encode(),
    }


def _to_torchscript(net: torch.nn.Module, example: torch.Tensor, path: Path, extra: Mapping[str, bytes]) -> str:
    from monai.networks.utils import convert_to_torchscript

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in favour of torch.export
        try:
            convert_to_torchscript(net, str(path), extra_files=dict(extra))
            return "script"
        except Exception as exc:  # the network's Python is outside TorchScript's subset
            log.info("torch.jit.script failed (%s: %s); tracing instead", type(exc).__name__, str(exc).splitlines()[0])
            convert_to_torchscript(net, str(path), extra_files=dict(extra), use_trace=True, inputs=[example])
            return "trace"


def _run_torchscript(path: Path, x: torch.Tensor) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ts = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return ts(x).numpy()


@contextlib.contextmanager
def _quiet_onnx_exporter() -> Iterator[None]:
    """Without the exporter's notes on optional torchvision ops and its libraries' deprecation warnings."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _dynamic_shapes(example: torch.Tensor) -> tuple[dict[int, Any], ...]:
    from torch.export import Dim

    return ({0: Dim("batch"), **{axis: Dim.AUTO for axis in range(2, example.ndim)}},)


def _to_onnx(net: torch.nn.Module, example: torch.Tensor, path: Path, props: Mapping[str, str], data_name: str) -> str:
    """Export to ``path``; weights past protobuf's limit go to ``data_name`` beside it (the final file's name)."""
    import onnx
    from monai.networks.utils import convert_to_onnx

    big = sum(p.numel() * p.element_size() for p in net.parameters()) >= ONNX_IN_FILE_LIMIT
    common: dict[str, Any] = dict(
        input_names=["image"], output_names=["pred"], dynamo=True, external_data=big, verbose=False
    )
    method = "dynamic"
    with tempfile.TemporaryDirectory(prefix=".onnx-", dir=path.parent) as tmp, _quiet_onnx_exporter():
        raw = Path(tmp) / "model.onnx"
        try:
            convert_to_onnx(net, [example], filename=str(raw), dynamic_shapes=_dynamic_shapes(example), **common)
        except Exception as exc:  # shape-dependent Python in forward(): export for the example's shape only
            log.warning(
                "ONNX export with dynamic shapes failed (%s: %s); exporting for the input size %s only",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
                tuple(example.shape),
            )
            convert_to_onnx(net, [example], filename=str(raw), **common)
            method = "static"
        proto = onnx.load(str(raw))
        for key, value in props.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, str(path), save_as_external_data=big, location=data_name if big else None)
    return method


def _run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def run_exported(path: str | Path, x: torch.Tensor) -> np.ndarray:
    """The output of an exported file (``.onnx``: onnxruntime on the CPU; else TorchScript) on ``x``."""
    path = Path(path)
    return _run_onnx(path, x) if path.suffix == ".onnx" else _run_torchscript(path, x)


def export_model(
    model: LoadedModel,
    output: str | Path,
    fmt: str = "torchscript",
    spatial: Sequence[int] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    seed: int = 0,
) -> ExportResult:
    """Export ``model.network`` to ``output`` and check the written file (see the module docstring).

    Raises:
        ConfigError: unknown format, missing ONNX packages, a network that cannot be exported, or an
            export whose output differs from the network's by more than ``atol + rtol * |network|``.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r} (choose {' or '.join(FORMATS)})", "--format")
    if fmt == "onnx":
        require_onnx()
    output = Path(output)
    shape = example_shape(model, spatial)
    net = model.network.to("cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(shape, generator=gen)
    check = torch.randn(shape, generator=gen)  # a second input: the export must not just replay the example
    with torch.no_grad():
        expected = net(check).numpy()
    try:
        with atomic_path(output) as tmp:
            if fmt == "torchscript":
                method = _to_torchscript(net, example, tmp, _extra_files(model))
            else:
                props = {
                    "segapp.bundle": model.name,
                    "segapp.bundle_version": model.version,
                    "segapp.labels": json.dumps({str(k): v for k, v in model.labels.items()}),
                    "segapp.example_input_shape": json.dumps(list(shape)),
                }
                method = _to_onnx(net, example, tmp, props, output.name + ".data")
            got = _run_torchscript(tmp, check) if fmt == "torchscript" else _run_onnx(tmp, check)
            if got.shape != expected.shape:
                raise ConfigError(
                    f"the exported model's output has shape {got.shape}, the network's {expected.shape}", str(output)
                )
            diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
            if not np.allclose(got, expected, rtol=rtol, atol=atol):
                raise ConfigError(
                    f"the exported model's output differs from the network's by up to {diff:.3g} "
                    f"(tolerance {atol} + {rtol} x |output|); nothing was written",
                    str(output),
                )
    except ConfigError:
        raise
    except Exception as exc:  # torch's exporters raise many types; name the step and the file
        raise ConfigError(
            f"{fmt} export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", str(output)
        ) from exc
    return ExportResult(output, fmt, method, shape, diff)


def export_bundle(
    bundle: str | Path | None,
    output: str | Path,
    fmt: str = "torchscript",
    run: str | Path | None = None,
    checkpoint: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    configs: Sequence[str] = (),
    trust: bool = False,
    spatial: Sequence[int] | None = None,
) -> ExportResult:
    """:func:`load_model` on the CPU, then :func:`export_model`."""
    if fmt == "onnx":
        require_onnx()  # before building anything
    model = load_model(bundle, checkpoint, run=run, overrides=overrides, device="cpu", configs=configs, trust=trust)
    return export_model(model, output, fmt, spatial)
