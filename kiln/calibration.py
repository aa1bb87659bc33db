"""INT8 calibration data sets: what `[models.X.calibration]` names, its content hash, its batches.

A data set is either a folder (`data`) of `.npz` files, one batch each with one array per model
input (named like the input), or `.npy` files, one batch each of a one-input model; files are taken
in name order, at most `batches` of them. Or a function (`function = "module:function"`, found like
a factory) that returns or yields batches: `{input: array}`, or an array for a one-input model.

`dataset_digest` is the content key of the data set: the folder's file names and the sha256 of
each (through the stat cache: an unchanged folder is not read, a no-op run hashes 0 bytes), or
for a function the sha256 of its module's file (the function's code decides what it yields; data
files it reads are not seen, see README). It is part of the engine key of INT8 builds and of the
calibration cache's store key (kiln.pipeline.calibration).

`write_batches` writes the batches as the one `.npz` the device's calibrator reads
(kiln/device_side/trt_api_build.py): arrays `batch00000.<input>`, float32 for float inputs, in C
order, checked against the model's input shapes (a dynamic input: its `opt` shape, where TensorRT
calibrates), byte-for-byte deterministic so equal data sends equal bytes.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Iterator

from kiln.config import Model
from kiln.errors import BuildError, ConfigError, ExportError
from kiln.files import atomic_write
from kiln.keys import HashCache, digest

__all__ = ["dataset_digest", "iter_batches", "write_batches", "FILE_SUFFIXES"]

FILE_SUFFIXES = (".npz", ".npy")


def _files(model: Model) -> list[Path]:
    folder = model.calibration["data"]
    files = sorted(p for p in folder.iterdir() if p.suffix in FILE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"the calibration folder {folder} of model {model.name} holds no .npz or .npy files",
                          model=model.name, hint="put one batch per .npz (arrays named by input) or .npy file there")
    limit = model.calibration.get("batches")
    return files[:limit] if limit else files


def _function_source(model: Model) -> Path:
    from kiln.model_code import find_module_file
    module = model.calibration["function"].split(":")[0]
    found = find_module_file(module, model.factory_path)
    if found is None:
        raise ConfigError(f"cannot find the module {module!r} of the calibration function of model {model.name}",
                          model=model.name, hint="put it next to the fleet file or in python_path, like a factory")
    return found


def dataset_digest(model: Model, hashes: HashCache) -> str:
    """The content key of the model's calibration data set (stat-cached; see the module doc)."""
    cal = model.calibration
    if cal is None:
        raise ValueError(f"model {model.name} has no calibration data set")
    if cal["data"] is not None:
        entries = [[f.name, hashes.sha256(f)] for f in _files(model)]
        return digest({"kind": "folder", "files": entries})
    return digest({"kind": "function", "function": cal["function"], "module_sha256": hashes.sha256(_function_source(model)),
                   "batches": cal.get("batches")})


def iter_batches(model: Model) -> Iterator[dict]:
    """The data set's batches as {input name: numpy array}."""
    import numpy as np
    cal = model.calibration
    if cal["data"] is not None:
        for f in _files(model):
            loaded = np.load(f, allow_pickle=False)
            if isinstance(loaded, np.ndarray):      # .npy: one batch of the only input
                yield _one_input(model, loaded, f.name)
                continue
            with loaded:
                yield {k: loaded[k] for k in loaded.files}
        return
    from kiln.factories import factory_imports, import_factory
    with factory_imports(model.factory_path):
        function = import_factory(cal["function"], model.factory_path, model=model.name)
        limit = cal.get("batches")
        for i, batch in enumerate(function()):
            if limit and i >= limit:
                break
            yield batch if isinstance(batch, dict) else _one_input(model, np.asarray(batch), f"batch {i}")


def _one_input(model: Model, array, where: str) -> dict:
    if len(model.inputs) != 1:
        raise ConfigError(f"calibration batch {where} of model {model.name} is one array, but the model has inputs "
                          f"{', '.join(model.inputs)}", model=model.name,
                          hint="use .npz files (or dicts) with one array per input, named like the inputs")
    return {next(iter(model.inputs)): array}


def _npy(array) -> bytes:
    import numpy as np
    out = io.BytesIO()
    np.lib.format.write_array(out, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    return out.getvalue()


def write_batches(model: Model, path: Path) -> int:
    """Write the data set as the device calibrator's .npz (deterministic bytes); -> number of batches."""
    import numpy as np
    wanted = model.input_shapes("opt" if model.shapes else None)
    members = []
    for i, batch in enumerate(iter_batches(model)):
        missing = [n for n in wanted if n not in batch]
        if missing:
            raise BuildError(f"calibration batch {i} of model {model.name} lacks input(s) {', '.join(missing)}",
                             model=model.name, hint=f"each batch needs arrays named {', '.join(wanted)}")
        for name, shape in wanted.items():
            array = np.asarray(batch[name])
            if tuple(array.shape) != tuple(shape):
                raise BuildError(f"calibration batch {i} of model {model.name}: input {name} has shape "
                                 f"{list(array.shape)}, the engine calibrates at {list(shape)}", model=model.name,
                                 hint="give batches of the model's input shape (of its opt shape for a range)")
            if array.dtype.kind == "f":
                array = array.astype(np.float32)
            members.append((f"batch{i:05d}.{name}.npy", _npy(array)))
    if not members:
        raise BuildError(f"the calibration data set of model {model.name} yielded no batch", model=model.name,
                         hint="check [models.<m>.calibration]")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))   # fixed: equal data, equal bytes
            z.writestr(info, data)
    atomic_write(path, buffer.getvalue())
    return len({m[0].split(".")[0] for m in members})


def quantize_qdq(model: Model, src: Path, dst: Path) -> Path:
    """Explicit quantization at export (`export.quantize = "qdq"`): ONNX Runtime's quantize_static
    writes QuantizeLinear/DequantizeLinear pairs into `src` -> `dst`, its scales from the model's
    calibration data set. As TensorRT wants them (docs/trtexec.md §10): INT8 activations and weights,
    symmetric (zero point 0), weights per output channel, on the convolutions and matrix products.
    The bytes are deterministic for equal inputs (tests/test_int8_qdq.py)."""
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    batches = iter(list(iter_batches(model)))

    class Reader(CalibrationDataReader):
        def get_next(self):
            batch = next(batches, None)
            return None if batch is None else {k: v.astype("float32") if v.dtype.kind == "f" else v
                                               for k, v in batch.items()}

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)   # quantize_static advises pre-processing through the root logger
    try:
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises many kinds
        raise ExportError(f"Q/DQ quantization of model {model.name} failed: {type(exc).__name__}: {exc}",
                         model=model.name, hint="check the calibration data set, or export without quantize") from exc
    finally:
        root.setLevel(level)
    return dst
