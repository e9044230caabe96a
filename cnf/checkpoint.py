"""Checkpoints: one plain dict of data, written atomically, loaded with ``weights_only=True``.

The schema (version 3), defined here and nowhere else:

==================  =========================================================================
``model_args``      the model's own arguments (:class:`cnf.model_config.ModelConfig`, a dict
                    holding its solvers' and its kind's dicts)
``data``            the dataset's description (``Dataset.meta()``: kind, shape, columns, ...)
``dataset``         how to open the same data again (:class:`cnf.data.DataSpec`, a dict)
``data_fingerprint`` a hash of the training data's content (``Dataset.fingerprint()``)
``config``          the training recipe (:class:`cnf.training.TrainConfig`, without the model;
                    the objectives' and the adaptation's settings as dicts)
``model``           the flow's ``state_dict``
``solver``          the adapted training solver: ``method``, ``step_size``, ``atol``, ``rtol``
``optimizer``, ``scheduler``  their ``state_dict``
``iteration``, ``best_val_nll``, ``stale_evals``  where training stands
``phase_best``      while a first phase's successor is pending: that phase's best weights
``training_model``  with ``--ema``: the weights being trained (``model`` is their average,
                    what is scored and used), and ``average_start``, where the average began
==================  =========================================================================

It never holds code: loading cannot execute anything, and a file that is not a cnf checkpoint
(or is truncated) gets a :class:`CheckpointError` that says so. Older files are upgraded when
read: version 1 (written before the model's arguments were kept apart from the recipe) and
version 2 (flat configs, before the solvers, fields, objectives and adaptation had their own).
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from cnf import options
from cnf.data.tabular import TABLE_DEFAULTS
from cnf.io import write_bytes
from cnf.model_config import ModelConfig

FORMAT = "cnf-checkpoint"
VERSION = 3
KEYS = ("model_args", "data", "dataset", "config", "model", "solver", "iteration")


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit what it is used for."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (the schema's keys) to ``path`` atomically (:func:`cnf.io.write_bytes`):
    serialized in memory, then a temporary file in the same directory, flushed to disk and
    renamed over the target, so a crash or a full disk never leaves a half-written checkpoint."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buffer)
    write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint (tensors on the CPU), check that it is one of ours, and upgrade an
    older version to the current schema."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: expected a file written by `cnf train`")
    try:
        with warnings.catch_warnings():  # torch warns about the formats it refuses: we say it
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses code; any failure means "not ours"
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if code:
            raise CheckpointError(
                f"{path} is not a cnf checkpoint: it holds code (it asks to call {code[1]}), "
                "which cnf never runs; loading it by other means can run arbitrary code, so "
                "do that only if you trust its source"
            ) from err
        detail = re.sub(r"\x1b\[[0-9;]*m", "", (str(err).strip().splitlines() or [""])[0])[:200]
        raise CheckpointError(
            f"{path} is corrupt or not a cnf checkpoint ({type(err).__name__}"
            f"{': ' + detail if detail else ''}); use another checkpoint or retrain"
        ) from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cnf checkpoint (no '{FORMAT}' marker)")
    if data.get("version") == 1:
        data = _upgrade_v1(data, path)
    if data.get("version") == 2:
        data = _upgrade_v2(data, path)
    if data.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is a version {data.get('version')} checkpoint; this cnf reads versions 1 "
            f"to {VERSION}: use the cnf release that wrote it"
        )
    missing = [k for k in KEYS if k not in data]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: it is damaged; retrain")
    return data


def _upgrade_v1(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Version 1 kept the model's arguments inside one flat config: split them out, and record
    how the data was opened."""
    config = data.get("config")
    if not isinstance(config, dict) or not isinstance(data.get("data"), dict):
        raise CheckpointError(f"{path} is a damaged version 1 checkpoint (no config); retrain")
    model_fields = V2_MODEL_FIELDS
    options = {
        k: config[k]
        for k, default in TABLE_DEFAULTS.items()
        if k in config and config[k] != default
    }
    options.update(config.get("extra") or {})
    if config.get("data_dir"):
        options["data_dir"] = config["data_dir"]
    return {
        **data,
        "version": 2,
        "model_args": {k: v for k, v in config.items() if k in model_fields},
        "config": {k: v for k, v in config.items() if k not in model_fields},
        "dataset": {
            "name": data["data"].get("name", config.get("data")),
            "seed": config.get("seed", 0),
            "options": options,
        },
    }


# version 2's flat model arguments, and the settings of the recipe that version 3 nests
V2_MODEL_FIELDS = frozenset(
    {"hidden", "activation", "trace", "noise", "T", "learn_T", "method", "atol", "rtol",
     "step_size", "adjoint", "max_nfe", "eval_method", "eval_atol", "eval_rtol",
     "eval_step_size", "dtype", "preprocess", "scales", "blocks", "alpha", "conv_layer", "field",
     "unet_width", "unet_resolutions", "unet_depth", "unet_dropout", "unet_scale_shift"}
)  # fmt: skip
V2_NESTED = {
    "mle": {"kinetic": "kinetic", "jacobian": "jacobian"},
    "fm": {k: k for k in ("coupling", "sigma_min", "time_sampling", "autocast")},
    "adaptation": {"adapt": "on", "adapt_every": "every", "adapt_size": "size",
                   "adapt_threshold": "threshold", "max_steps": "max_steps"},
}  # fmt: skip


def _upgrade_v2(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Version 2 kept every setting flat: the solvers', the image field's and the objectives'
    beside the rest, whatever the kind of data. Nest them, keeping those of this kind."""
    flat, config = data.get("model_args"), data.get("config")
    if not isinstance(flat, dict) or not isinstance(config, dict):
        raise CheckpointError(f"{path} is a damaged version 2 checkpoint; retrain")
    kind = data["data"].get("kind") if isinstance(data.get("data"), dict) else None
    base = ModelConfig.for_kind(kind)
    if kind == "image":
        base = base.replace(field=flat.get("field", "conv"))
    flat = {**flat, "eval_max_nfe": flat.get("max_nfe", 10_000)}  # one limit served both
    present = options.flatten(base)
    model = base.replace(**{k: v for k, v in flat.items() if k in present})
    config = dict(config)
    for part, names in V2_NESTED.items():
        config[part] = {new: config.pop(old) for old, new in names.items() if old in config}
    return {**data, "version": VERSION, "model_args": model.to_dict(), "config": config}
