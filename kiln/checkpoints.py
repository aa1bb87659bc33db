"""A model's weights from its checkpoint file, read without running code from the file.

Accepted (README "Checkpoints"):

* a state_dict: `torch.save(model.state_dict(), path)`;
* a training checkpoint, a dict holding the weights under `state_dict` (PyTorch Lightning),
  `model_state_dict` (PyTorch's "saving a general checkpoint" recipe) or `model`; the other
  entries (optimizer, epoch, hyper-parameters, callbacks) are not used;
* a safetensors file (`safetensors.torch.save_file(model.state_dict(), path)`), by its
  `.safetensors` name or its header; needs the `safetensors` package (`pip install
  enginekiln[safetensors]`), imported only for such a file.

Keys: used as they are when they are exactly the factory's model's keys. Otherwise, if every key
of the checkpoint that carries one leading prefix, with the prefix removed, is exactly the model's
keys, and only one prefix does that, the prefix is removed. That is the shape of a LightningModule
that holds the network as an attribute: Lightning saves the LightningModule's own state_dict, whose
keys start with the attribute's name (`self.model = Net()` saves `model.conv1.weight`) and Lightning
strips nothing (its docs load `checkpoint["state_dict"]` into a module of the same structure). The
same rule covers `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile). Nothing is ever
loaded partially: the match is exact, or the export fails naming the missing and unexpected keys.

Pickled code is refused. `torch.load(weights_only=True)` refuses every class it does not know; a
training checkpoint may hold such objects *outside* its weights (Lightning hyper-parameters as an
`argparse.Namespace` or a `pathlib` path). Those are read as inert placeholders (the unpickler
creates an instance of a class of ours that ignores its arguments; nothing named in the file is
imported or called) and never used. Where the weights themselves are such an object (a whole model
saved with `torch.save(model)`), the checkpoint is refused with how to convert it. torch's own
advice for that case (to load with weights_only=False, running the file's code) is never shown.
"""
from __future__ import annotations

import re
import struct
import threading
from pathlib import Path
from typing import Any, Mapping

from kiln.errors import ExportError

#: dict entries that hold the weights in a training checkpoint, in the order they are looked for
WEIGHTS_ENTRIES = ("state_dict", "model_state_dict", "model")

CONVERT_HINT = (
    "save the weights only, where the model object exists (your training code): "
    "`torch.save(model.state_dict(), \"model.pt\")` or, with safetensors, "
    "`safetensors.torch.save_file(model.state_dict(), \"model.safetensors\")`; for a Lightning "
    "checkpoint, `lit = MyLightningModule.load_from_checkpoint(path)` then save `lit.model.state_dict()` "
    "the same way. Then point `checkpoint` in the fleet file at the new file (README: Checkpoints)")

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global")
_LOAD_LOCK = threading.Lock()  # torch's safe-globals list is process-wide


class Placeholder:
    """What a class or function named in a checkpoint becomes when it is not plain data."""
    __slots__ = ()
    pickled_name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_name}>"


def _placeholder_class(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (Placeholder,), {"__slots__": (), "pickled_name": name})


def is_safetensors(path: Path) -> bool:
    """A `.safetensors` name, or the format's header: 8-byte little-endian JSON length, then `{`."""
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length <= size - 8


def read_state_dict(path: Path, *, model: str | None = None) -> dict:
    """The weights in `path` as {key: tensor} (torch imported here)."""
    if is_safetensors(path):
        return _read_safetensors(path, model)
    obj = _torch_load(path, model)
    return _weights_of(obj, path, model)


def _read_safetensors(path: Path, model: str | None) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ExportError(f"checkpoint {path} is a safetensors file, and the safetensors package is not installed",
                          model=model, hint="pip install safetensors (or enginekiln[safetensors])") from exc
    try:
        return dict(load_file(str(path), device="cpu"))
    except OSError:
        raise  # the machine's problem (kiln.oserrors explains it)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a bad file
        raise ExportError(f"cannot read safetensors checkpoint {path}: {type(exc).__name__}: {exc}", model=model,
                          hint="the file is damaged or not a safetensors file; save it again") from exc


def _torch_load(path: Path, model: str | None) -> Any:
    import pickle

    import torch

    names: set[str] = set()
    try:  # the classes the pickle names that weights_only would refuse (reads the pickle, runs nothing)
        names.update(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except OSError:
        raise
    except Exception:  # noqa: BLE001 - the legacy (non-zip) format: learnt one by one below
        pass
    with _LOAD_LOCK:
        for _ in range(32):
            allowed = [(_placeholder_class(n), n) for n in sorted(names)]
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location="cpu", weights_only=True)
            except OSError:
                raise
            except pickle.UnpicklingError as exc:
                found = _UNSUPPORTED_GLOBAL.search(str(exc))
                if found is None or found.group(1) in names:
                    raise _unreadable(path, model, exc) from None
                names.add(found.group(1))
            except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
                raise _unreadable(path, model, exc) from None
    raise ExportError(f"checkpoint {path} names too many classes that are not plain data", model=model,
                      hint=CONVERT_HINT)


def _unreadable(path: Path, model: str | None, exc: Exception) -> ExportError:
    """torch's reason, without its advice to load with weights_only=False (which runs code from the file)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    text = " ".join(text.split())
    if "weights_only" in text or "safe_globals" in text:
        text = text.split(". ")[0]
    if "weights_only" in text:
        text = "the file holds something a safe load refuses"
    return ExportError(f"cannot load checkpoint {path}: {type(exc).__name__}: {text[:300]}", model=model,
                       hint="the file is damaged, or not a PyTorch checkpoint of weights; " + CONVERT_HINT)


def _weights_of(obj: Any, path: Path, model: str | None) -> dict:
    import torch

    if isinstance(obj, Placeholder):
        raise _pickled(path, model, obj, "the file")
    if not isinstance(obj, Mapping):
        raise ExportError(f"checkpoint {path} holds a {type(obj).__name__}, not weights", model=model,
                          hint=CONVERT_HINT)
    state, where = obj, "the file"
    if not _all_tensors(obj):
        for entry in WEIGHTS_ENTRIES:
            value = obj.get(entry)
            if isinstance(value, Placeholder):
                raise _pickled(path, model, value, f"its entry {entry!r}")
            if isinstance(value, Mapping) and value and _all_tensors(value):
                state, where = value, f"its entry {entry!r}"
                break
        else:
            if any(isinstance(k, str) and "." in k for k in obj) and any(isinstance(v, torch.Tensor) for v in obj.values()):
                state = obj  # a state_dict with an extra non-tensor value: load_state_dict says which
            else:
                keys = ", ".join(repr(k) for k in list(obj)[:8])
                raise ExportError(f"checkpoint {path} is a dict ({keys}) with no weights under "
                                  f"{', '.join(repr(e) for e in WEIGHTS_ENTRIES)}", model=model, hint=CONVERT_HINT)
    bad = [k for k, v in state.items() if isinstance(v, Placeholder)]
    if bad:
        raise _pickled(path, model, state[bad[0]], f"{where}, key {bad[0]!r}")
    return dict(state)


def _all_tensors(value: Mapping) -> bool:
    import torch
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _pickled(path: Path, model: str | None, obj: Placeholder, where: str) -> ExportError:
    what = "is" if where == "the file" else f"holds in {where}"
    return ExportError(f"checkpoint {path} {what} a pickled Python object ({obj.pickled_name}), not plain "
                       "weights: enginekiln does not run code from checkpoint files", model=model, hint=CONVERT_HINT)


def fit_state_dict(state: dict, wanted: set[str], *, path: Path, model: str | None = None) -> tuple[dict, str]:
    """`state` with its keys matching `wanted` (the model's own state_dict keys): as they are,
    or without the one leading prefix that makes them match exactly. Returns (state, prefix)."""
    if set(state) == wanted:
        return state, ""
    prefixes = set()
    for key in wanted:  # candidate prefixes: what precedes a model key in a checkpoint key
        for k in state:
            if k.endswith("." + key):
                prefixes.add(k[: len(k) - len(key)])
        break
    matching = sorted(p for p in prefixes if {k[len(p):] for k in state if k.startswith(p)} == wanted)
    if len(matching) == 1:
        prefix = matching[0]
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, prefix
    if len(matching) > 1:
        raise ExportError(f"checkpoint {path} holds the model's weights several times, under "
                          f"{', '.join(repr(p) for p in matching)}", model=model,
                          hint="save the one you want on its own (`torch.save(lit.<attribute>.state_dict(), path)`)")
    # the closest reading (as is, or under one prefix) says best what differs
    for key in wanted:
        prefixes.update(k[: len(k) - len(key)] for k in state if k.endswith("." + key) and k != key)
    overlap = lambda p: len({k[len(p):] for k in state if k.startswith(p)} & wanted)
    best = max(sorted(prefixes | {""}), key=overlap)
    have = {k[len(best):] for k in state if k.startswith(best)}
    missing, unexpected = sorted(wanted - have), sorted(have - wanted)
    under = f" (keys under {best!r})" if best else ""
    show = lambda keys: ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    raise ExportError(f"checkpoint {path.name} does not fit the factory's model{under}: "
                      + "; ".join(part for part in (f"missing {show(missing)}" if missing else "",
                                                    f"unexpected {show(unexpected)}" if unexpected else "") if part),
                      model=model, hint="the checkpoint and the factory must describe the same architecture")
