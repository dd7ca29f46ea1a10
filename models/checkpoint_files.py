"""Checkpoint files that loading cannot turn into running code.

A checkpoint is one ``.safetensors`` file: its tensors, and everything else (format, model
name, config, metrics, optimiser hyper-parameters...) as one JSON document in the file's
metadata under ``META_KEY``. Reading it parses a length-prefixed JSON header and copies raw
tensor bytes (the safetensors format); nothing in the file is ever executed, unlike a pickle.

A trial's state file (``encode_trial_state``) holds the optimiser's tensors and random state the
same way; the optimiser's parameter groups are JSON.

Files written before this format (``torch.save`` pickles: ``model.pt``, ``state.pt``) are
recognised by their first bytes and refused with the way to convert them
(``python -m ensembles.convert``), never unpickled here.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as tensors_from_bytes
from safetensors.torch import save as tensors_to_bytes

from models.config import ConfigError

SUFFIX = ".safetensors"
META_KEY = "anomaly_ensemble"  # the safetensors metadata entry holding the JSON document
HEADER_LIMIT = 100 << 20  # the safetensors library's own bound on a header
CONVERT_HINT = ("convert the run it belongs to with `python -m ensembles.convert RUN_DIR` (it reads such files "
                "with torch's weights-only loader and rewrites them as .safetensors)")


class PickledCheckpointError(ConfigError):
    """A checkpoint written with ``torch.save`` (a pickle): refused, not loaded."""


def encode(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """The bytes of one checkpoint file: ``tensors`` (copied to the CPU; tensors that share memory
    are stored apart) and ``meta`` as JSON."""
    seen: set[int] = set()
    plain = {}
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        if value.numel() and value.untyped_storage().data_ptr() in seen:
            value = value.clone()
        if value.numel():
            seen.add(value.untyped_storage().data_ptr())
        plain[key] = value
    return tensors_to_bytes(plain, metadata={META_KEY: json.dumps(meta)})


def encode_model(ckpt: dict[str, Any]) -> bytes:
    """A model checkpoint (``AnomalyModel.checkpoint()``'s dict): its ``state_dict`` as the
    tensors, the rest as JSON."""
    return encode(ckpt["state_dict"], {"kind": "model", **{k: v for k, v in ckpt.items() if k != "state_dict"}})


def write(path: str | os.PathLike, data: bytes) -> None:
    """Write a checkpoint file whole (a temporary file renamed into place: a reader never sees a part)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def kind_of(head: bytes) -> str:
    """``safetensors``, ``pickle`` (``torch.save``'s zip archive or a bare pickle) or ``unknown``,
    from a file's first bytes."""
    # safetensors first: its header length may start with the byte 0x80 that opens a pickle
    if len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= HEADER_LIMIT:
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "pickle"
    return "unknown"


def is_pickle(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` is a pickle, from its first bytes (nothing else is read)."""
    with open(path, "rb") as f:
        return kind_of(f.read(9)) == "pickle"


def refuse_unless_safetensors(head: bytes, name: str) -> None:
    kind = kind_of(head)
    if kind == "pickle":
        raise PickledCheckpointError(
            f"{name} is a pickled checkpoint (torch.save, from before checkpoints were .safetensors, or not "
            f"written by this package): it is not loaded, because unpickling can run code; {CONVERT_HINT}")
    if kind != "safetensors":
        raise ConfigError(f"{name} is not a checkpoint file (.safetensors) this package wrote")


def meta_of(header: dict, name: str) -> dict[str, Any]:
    raw = (header.get("__metadata__") or {}).get(META_KEY)
    if raw is None:
        raise ConfigError(f"{name} is a safetensors file, but not a checkpoint of this package (no {META_KEY!r} "
                          "metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{name}: its {META_KEY!r} metadata is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{name}: its {META_KEY!r} metadata is not a JSON object")
    return meta


def decode(data: bytes, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a checkpoint file's bytes; ``name`` (its path) is for errors."""
    refuse_unless_safetensors(data[:9], name)
    size = struct.unpack("<Q", data[:8])[0]
    try:
        header = json.loads(data[8:8 + size])
        tensors = tensors_from_bytes(data)
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as err:
        raise ConfigError(f"{name} is damaged or incomplete ({type(err).__name__}: {err}); copy it again or "
                          "retrain") from None
    return tensors, meta_of(header, name)


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a checkpoint file on this machine."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return decode(path.read_bytes(), str(path))


# ----- a trial's state: what a resume needs besides the model -----------------------------
OPTIMIZER_TENSOR = "optimizer.{param}.{name}"  # a tensor of the optimiser's per-parameter state
RNG_TENSOR = "rng"  # torch's CPU random state


def optimizer_to_files(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser's ``state_dict()`` as tensors and JSON: per-parameter tensors (moments, step)
    by name, per-parameter non-tensor values and the parameter groups (learning rate, betas...) as JSON."""
    tensors, scalars = {}, {}
    for param, values in state_dict["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[OPTIMIZER_TENSOR.format(param=param, name=name)] = value
            else:
                scalars.setdefault(str(param), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    """The ``state_dict()`` that ``optimizer_to_files`` wrote (JSON lists in the groups, such as
    ``betas``, back to tuples)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, param, name = key.split(".", 2)
            state.setdefault(int(param), {})[name] = value
    for param, values in meta["scalars"].items():
        state.setdefault(int(param), {}).update(values)
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def encode_trial_state(optimizer_state: dict | None, epoch: int, metrics: dict, job: dict,
                       rng: torch.Tensor) -> bytes:
    """A trial's ``state.safetensors``: optimiser state (None once the trial ended), epoch,
    metrics, the training job (JSON) and torch's random state."""
    tensors, optimizer = optimizer_to_files(optimizer_state) if optimizer_state is not None else ({}, None)
    return encode({**tensors, RNG_TENSOR: rng},
                  {"kind": "trial-state", "epoch": epoch, "metrics": metrics, "job": job, "optimizer": optimizer})


def decode_trial_state(data: bytes, name: str) -> dict[str, Any]:
    """``{"optimizer": state dict or None, "epoch", "metrics", "job", "rng"}`` of a trial's state
    file's bytes."""
    tensors, meta = decode(data, name)
    if meta.get("kind") != "trial-state":
        raise ConfigError(f"{name} is not a trial's state file (kind {meta.get('kind')!r})")
    optimizer = meta["optimizer"]
    return {**meta, "rng": tensors[RNG_TENSOR],
            "optimizer": optimizer_from_files(tensors, optimizer) if optimizer is not None else None}
