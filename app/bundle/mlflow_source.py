"""Bundles as MLflow models: logged by training, registered, and fetched back by ``runs:/`` and ``models:/`` URIs.

**The model.** :func:`log_bundle_model` logs a bundle folder (``configs/`` with ``inference.json``,
``evaluate.json``, ``metadata.json``; ``models/model.pt``; the licence) as an MLflow ``python_function``
model whose artifacts are that folder (``data/bundle`` in the model). It is loaded by this module's
``_load_pyfunc`` (named in the MLmodel file: nothing is pickled), which builds the network with
:func:`app.bundle.model.load_model`. Its ``predict`` takes a float32 array ``(N, channels, X, Y, Z)`` in
the network's input space (after the bundle's preprocessing: oriented, resampled, normalised voxels)
and returns the ``uint8`` label map ``(N, X, Y, Z)`` of the bundle's inferer (sliding window) and an
argmax; the input example is the smallest input the metadata allows, the signature says the same.
Training logs the final weights as ``model`` and the best as ``best_model`` (``app.training.tracking``);
:func:`register_bundle_model` adds a version of a registered model from such a run.

**Fetching.** :func:`fetch_mlflow_bundle` turns ``runs:/RUN_ID/model``, ``models:/NAME/VERSION``,
``models:/NAME@ALIAS``, ``models:/NAME/latest`` or ``models:/MODEL_ID`` into a local bundle folder:
the model is downloaded from the tracking server (``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``)
into ``<bundle store>/.mlflow/<key>/`` (``app.bundle.store.store_dir``), with ``segapp_source.json``
saying where it came from. Run artifacts and numbered versions do not change, so a cached copy is used
again without asking the server; an alias or ``latest`` is resolved to its version first.

**Trust.** A model fetched from the user's own tracking server or registry is treated like a bundle
fetched by ``segapp bundle download``: its configs are recorded as trusted when it is fetched
(``app.bundle.trust``), and an edited copy is untrusted again. Whoever loads the MLflow model with
``mlflow.pyfunc.load_model`` has chosen to run that model's code, so ``_load_pyfunc`` runs it without a
record. Tracking URIs are written to records and messages without any ``user:password@``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from app import __version__
from app.bundle.store import is_bundle, store_dir
from app.errors import ConfigError, InputError

log = logging.getLogger(__name__)

PREFIXES = ("runs:/", "models:/")
SOURCE_FILE = "segapp_source.json"
BUNDLE_DATA = "bundle"  # the bundle's folder name inside the model's data/
FINAL_MODEL, BEST_MODEL = "model", "best_model"
# a pre-flight request that fails fast on a dead server (MLflow retries for minutes by default)
PREFLIGHT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def is_mlflow_uri(value: object) -> bool:
    """Whether a bundle argument is an MLflow ``runs:/`` or ``models:/`` URI."""
    return isinstance(value, str) and value.startswith(PREFIXES)


def redact(uri: str) -> str:
    """``uri`` without the ``user:password@`` of its network location."""
    parts = urlsplit(uri)
    if parts.netloc and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return uri


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The tracking URI given, else ``$MLFLOW_TRACKING_URI``; a sqlite store must exist (MLflow would create one)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError(
            "a runs:/ or models:/ bundle needs the MLflow tracking server: pass --tracking-uri or set "
            "MLFLOW_TRACKING_URI",
            "--tracking-uri",
        )
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.is_file():
            raise InputError("no MLflow database at this sqlite tracking URI", str(db))
    return uri


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def tracking(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` for the duration, then as it was (unset included).

    For the fluent API (``Model.log``, ``register_model``), and for downloads: MLflow 3 resolves a
    ``models:/`` URI with the global registry even when ``download_artifacts`` is given other URIs.
    The registry follows the tracking URI unless ``$MLFLOW_REGISTRY_URI`` names another.
    """
    import mlflow

    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)  # (MLflow also exports it as $MLFLOW_TRACKING_URI)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # None unsets it, and the variable


def registry_uri(tracking_uri: str) -> str:
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri


def _mlflow_error(exc: Exception, uri: str, tracking_uri: str) -> InputError:
    """One line for a failed request: the server cannot be reached, the object is not there, or another failure."""
    code = str(getattr(exc, "error_code", ""))
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    first = re.sub(r"//[^/@\s]+@", "//", first)  # no credentials from URLs in the message
    if any(s in first for s in ("Max retries", "Connection refused", "NewConnectionError", "timed out", "Timeout")):
        return InputError(
            "cannot reach the MLflow tracking server (is it running, and is the URI right?)", redact(tracking_uri)
        )
    if (
        code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")
        or "not found" in first.lower()
        or "unable to find" in first.lower()
    ):
        return InputError(f"not found in the MLflow tracking server {redact(tracking_uri)}: {first[:200]}", uri)
    return InputError(f"MLflow request failed ({redact(tracking_uri)}): {type(exc).__name__}: {first[:200]}", uri)


# -- resolving a URI to something immutable ----------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """A fetchable model: the URI to download, and the key of its cached copy."""

    download_uri: str
    key: str
    run_id: str | None = None
    version: str | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[:80] or "model"


def _key(tracking_uri: str, *parts: str) -> str:
    digest = hashlib.sha256(redact(tracking_uri).encode()).hexdigest()[:10]
    return "-".join([*(_slug(p) for p in parts), digest])


def _parse(uri: str, tracking_uri: str) -> tuple[ModelRef | None, str]:
    """The ref when ``uri`` names an immutable model (no server needed), and its kind."""
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/") :].partition("/")
        if not run_id or not path:
            raise ConfigError("a run's model is runs:/RUN_ID/ARTIFACT_PATH (e.g. runs:/<id>/model)", uri)
        return ModelRef(uri, _key(tracking_uri, "run", run_id, path), run_id=run_id), "run"
    rest = uri[len("models:/") :].strip("/")
    if not rest:
        raise ConfigError("a registered model is models:/NAME/VERSION or models:/NAME@ALIAS", uri)
    if "@" in rest:
        return None, "alias"
    name, _, version = rest.rpartition("/")
    if name and version.isdigit():
        return ModelRef(
            f"models:/{name}/{version}", _key(tracking_uri, "model", name, "v" + version), version=version
        ), "version"
    if name and version == "latest":
        return None, "latest"
    if not name and "/" not in rest:
        return ModelRef(uri, _key(tracking_uri, "logged", rest)), "logged"
    raise ConfigError("a registered model is models:/NAME/VERSION, models:/NAME@ALIAS or models:/NAME/latest", uri)


def _resolve(uri: str, kind: str, tracking_uri: str) -> ModelRef:
    """Ask the server (failing fast when it is down) what an alias or ``latest`` means, or whether a run exists."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri(tracking_uri))
    rest = uri[len("models:/") :].strip("/")
    try:
        with _env(PREFLIGHT_ENV):
            if kind == "alias":
                name, _, alias = rest.partition("@")
                mv = client.get_model_version_by_alias(name, alias)
            elif kind == "latest":
                name = rest.rpartition("/")[0]
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise InputError(f"registered model {name!r} has no versions in {redact(tracking_uri)}", uri)
                mv = max(versions, key=lambda v: int(v.version))
            else:
                ref, _ = _parse(uri, tracking_uri)
                assert ref is not None
                if kind == "run":
                    client.get_run(ref.run_id)  # type: ignore[arg-type]
                elif kind == "version":
                    client.get_model_version(rest.rpartition("/")[0], ref.version)  # type: ignore[arg-type]
                else:
                    client.get_logged_model(rest)
                return ref
    except InputError:
        raise
    except Exception as exc:  # MlflowException, requests' ConnectionError, timeouts
        raise _mlflow_error(exc, uri, tracking_uri) from exc
    return ModelRef(
        f"models:/{mv.name}/{mv.version}",
        _key(tracking_uri, "model", mv.name, "v" + str(mv.version)),
        run_id=mv.run_id,
        version=str(mv.version),
    )


# -- fetching -----------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where fetched MLflow models are kept: ``<bundle store>/.mlflow``."""
    return store_dir() / ".mlflow"


def _bundle_in(model_dir: Path) -> Path:
    """The bundle folder inside a downloaded MLflow model (or the download itself when it is a bundle)."""
    mlmodel = model_dir / "MLmodel"
    if mlmodel.is_file():
        import yaml

        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        data = flavor.get("data")
        if isinstance(data, str) and data:
            inside = (model_dir / data).resolve()
            if not inside.is_relative_to(model_dir.resolve()):  # the MLmodel file comes from the server
                raise ConfigError(f"the MLmodel file's data path {data!r} leaves the model's folder", str(mlmodel))
            if is_bundle(inside):
                return model_dir / data
    if is_bundle(model_dir):
        return model_dir
    raise ConfigError(
        "not a segapp bundle model: no MLmodel whose python_function data is a bundle, and no configs/metadata.json",
        str(model_dir),
    )


def _cached(folder: Path) -> Path | None:
    """The bundle of a complete cached download; its trust is recorded again when its configs are as fetched."""
    from app.bundle.trust import bundle_digest, is_recorded, trust_bundle

    try:
        info = json.loads((folder / SOURCE_FILE).read_text())
        bundle = folder / str(info["bundle"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not is_bundle(bundle):
        return None
    if not is_recorded(bundle) and bundle_digest(bundle) == info.get("configs_sha256"):
        trust_bundle(bundle, reason=f"fetched from MLflow {info.get('uri')} ({info.get('tracking_uri')})")
    return bundle


def fetch_mlflow_bundle(uri: str, tracking_uri: str | None = None) -> Path:
    """The local bundle folder of an MLflow model URI, downloaded once and recorded as trusted.

    Args:
        uri: ``runs:/RUN_ID/PATH``, ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/NAME/latest``
            or ``models:/MODEL_ID``.
        tracking_uri: the MLflow tracking server (also the registry); default ``$MLFLOW_TRACKING_URI``.

    Raises:
        ConfigError: a malformed URI, no tracking URI, or a model that is not a segapp bundle.
        InputError: the server cannot be reached, or has no such run, model or version.
    """
    from app.bundle.trust import bundle_digest, trust_bundle

    tracking_uri = resolve_tracking_uri(tracking_uri)
    ref, kind = _parse(uri, tracking_uri)
    if ref is not None and (hit := _cached(cache_dir() / ref.key)) is not None:
        log.info("MLflow model %s: cached copy %s", uri, hit)
        return hit
    ref = _resolve(uri, kind, tracking_uri)
    final = cache_dir() / ref.key
    if (hit := _cached(final)) is not None:
        return hit
    import mlflow.artifacts

    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=final.parent) as tmp:
        try:
            with _env({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}), tracking(tracking_uri):
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=ref.download_uri,
                        dst_path=str(Path(tmp) / "download"),  # inside tmp: the result is moved out of it
                        tracking_uri=tracking_uri,
                        registry_uri=registry_uri(tracking_uri),
                    )
                )
        except Exception as exc:  # MlflowException, OSError, requests' errors
            raise _mlflow_error(exc, uri, tracking_uri) from exc
        bundle = _bundle_in(local)
        rel = bundle.relative_to(local).as_posix() or "."
        info = {
            "uri": uri,
            "resolved": ref.download_uri,
            "tracking_uri": redact(tracking_uri),
            "run_id": ref.run_id,
            "version": ref.version,
            "bundle": rel,
            "configs_sha256": bundle_digest(bundle),
            "fetched": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (local / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.replace(local, final)
        except OSError:  # another process fetched it first (a non-empty folder cannot be replaced)
            if _cached(final) is None:
                raise
    bundle = final / rel
    trust_bundle(bundle, reason=f"fetched from MLflow {uri} ({redact(tracking_uri)})")
    log.info("MLflow model %s -> %s", uri, bundle)
    return bundle


# -- logging and registering ----------------------------------------------------------------------------
def input_example(metadata: dict) -> np.ndarray:
    """A seeded random float32 input of the smallest shape the metadata allows, ``(1, channels, X, Y, Z)``."""
    from monai.bundle.scripts import _get_fake_spatial_shape

    image = ((metadata.get("network_data_format") or {}).get("inputs") or {}).get("image") or {}
    spatial = image.get("spatial_shape") or [16, 16, 16]
    shape = (1, int(image.get("num_channels", 1)), *_get_fake_spatial_shape(spatial, p=1, n=1, any=1))
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def signature(channels: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, -1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))]),
    )


def _requirements() -> list[str]:
    import monai
    import torch

    return [f"segapp=={__version__}", f"monai=={monai.__version__}", f"torch=={torch.__version__.split('+')[0]}"]


def log_bundle_model(
    tracking_uri: str, run_id: str, bundle_root: str | Path, weights: str | Path, name: str = FINAL_MODEL
) -> Any:
    """Log the bundle at ``bundle_root`` with ``weights`` as ``models/model.pt`` as MLflow model ``name`` of the run.

    Only ``configs/``, ``LICENSE`` and the weights are taken (not the run's checkpoints or logs).
    Returns MLflow's ``ModelInfo`` (``model_uri``, ``model_id``).
    """
    import mlflow.pyfunc
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    root = Path(bundle_root)
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    example = input_example(meta)
    with tempfile.TemporaryDirectory(prefix="segapp-mlflow-model-") as tmp:
        bundle = Path(tmp) / BUNDLE_DATA
        shutil.copytree(root / "configs", bundle / "configs")
        if (root / "LICENSE").is_file():
            shutil.copy2(root / "LICENSE", bundle / "LICENSE")
        (bundle / "models").mkdir()
        shutil.copy2(weights, bundle / "models" / "model.pt")
        # the LoggedModel is created here, in the run's experiment (Model.log alone would put it in the
        # active or default experiment), then Model.log saves, links and finalises it
        client = MlflowClient(tracking_uri)
        run = client.get_run(run_id)
        logged = client.create_logged_model(
            run.info.experiment_id,
            name=name,
            source_run_id=run_id,
            params=dict(run.data.params),
            tags={"segapp.bundle": str(meta.get("name", "")), "segapp.bundle_version": str(meta.get("version", ""))},
        )
        with tracking(tracking_uri):
            return Model.log(
                None,  # artifact_path: deprecated in favour of name
                name=name,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                model_id=logged.model_id,
                loader_module=__name__,
                data_path=str(bundle),
                signature=signature(example.shape[1]),
                input_example=example,
                pip_requirements=_requirements(),
            )


def register_bundle_model(tracking_uri: str, run_id: str, name: str, artifact: str = FINAL_MODEL) -> Any:
    """A new version of registered model ``name`` (created if missing) from the run's logged model ``artifact``.

    Returns MLflow's ``ModelVersion`` (its ``run_id`` is the source run).
    """
    import mlflow

    with tracking(tracking_uri):
        try:
            return mlflow.register_model(f"runs:/{run_id}/{artifact}", name)
        except Exception as exc:  # MlflowException: no such logged model, bad name, server down
            raise _mlflow_error(exc, f"runs:/{run_id}/{artifact}", tracking_uri) from exc


# -- the pyfunc flavour -----------------------------------------------------------------------------------
class BundlePyfunc:
    """What ``mlflow.pyfunc.load_model`` returns for a segapp bundle model (see the module docstring)."""

    def __init__(self, bundle: str | Path, device: str = "auto"):
        from app.bundle.model import load_model

        self.model = load_model(bundle, device=device, trust=True)

    def predict(self, model_input: Any, params: dict | None = None) -> np.ndarray:
        import torch

        m = self.model
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32), device=m.device)
        if x.ndim != 5:
            raise InputError(f"expected a (N, channels, X, Y, Z) float32 array, got shape {tuple(x.shape)}", "input")
        with torch.no_grad(), torch.autocast(m.device.type, enabled=m.amp):
            logits = m.inferer(x, m.network)
        return logits.argmax(1).to(torch.uint8).cpu().numpy()


def _load_pyfunc(data_path: str) -> BundlePyfunc:
    """MLflow's entry point for the ``python_function`` flavour (``loader_module`` in the MLmodel file)."""
    return BundlePyfunc(data_path)
