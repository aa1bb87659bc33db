"""Hardware classes: devices that can share one engine.

A backend names the fingerprint fields an engine is married to (CLASS_FIELDS,
the single place that says so; docs/devices.md §7); the digest of those fields
(plus any extra fields a target asks for) is the class. Identical devices share
a class, so a fleet pays for one build per class. A fingerprint that lacks what
its backend's class needs (a `tensorrt` target without TensorRT, ...) is refused
with a ProbeError (`require_class_fields`), so no class like `...-trtnone-...`
can ever be formed. `describe_change` is the single describer of drift.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from kiln.errors import ProbeError
from kiln.keys import digest

__all__ = ["CLASS_FIELDS", "LABELS", "HardwareClass", "hardware_class", "require_class_fields",
           "describe_change"]

# backend -> fingerprint fields that decide engine compatibility (docs/devices.md §7)
CLASS_FIELDS = {
    "onnxruntime": ("arch", "cpu_flags", "onnxruntime"),
    "tensorrt": ("module", "board_model", "gpu_name", "compute_capability", "tensorrt", "cuda", "cudnn", "l4t"),
}
LABELS = {"tensorrt": "TensorRT", "cuda": "CUDA", "cudnn": "cuDNN", "l4t": "L4T", "onnxruntime": "ONNX Runtime",
          "compute_capability": "compute capability", "cpu_flags": "CPU ISA", "board_model": "board",
          "gpu_name": "GPU", "power_mode": "power mode", "module": "module", "arch": "architecture"}


@dataclass(frozen=True)
class HardwareClass:
    backend: str
    fields: dict
    digest: str

    @property
    def id(self) -> str:
        """Readable and unique: e.g. `cpu-x86_64-avx2-ort1.32.0-3f9c2a7b1e`."""
        return f"{self.label}-{self.digest[:10]}"

    @property
    def label(self) -> str:
        f = self.fields
        if self.backend == "onnxruntime":
            flags = f.get("cpu_flags") or []
            isa = next((x for x in ("avx512f", "avx2", "avx", "sve2", "sve", "asimd") if x in flags), "base")
            text = f"cpu-{f.get('arch')}-{isa}-ort{f.get('onnxruntime')}"
        else:
            device = f.get("module") or f.get("board_model") or f.get("gpu_name") or "gpu"
            text = f"{device}-sm{f.get('compute_capability')}-trt{f.get('tensorrt')}"
        return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower()[:48]


def require_class_fields(backend: str, fingerprint: Mapping, target: str | None = None) -> None:
    """Raise ProbeError unless `fingerprint` holds what a `backend` hardware class needs.

    tensorrt: an NVIDIA GPU (kind jetson or gpu), a GPU identity (module, board or
    GPU name), TensorRT, the compute capability, and on a Jetson the L4T version.
    onnxruntime: ONNX Runtime on the target. The error names the target and every
    missing piece, with the next step.
    """
    if backend not in CLASS_FIELDS:
        raise ProbeError(f"unknown backend {backend!r}; known: {', '.join(sorted(CLASS_FIELDS))}",
                         target=target)
    fp = fingerprint
    name = target or "<target>"
    rerun = f"then re-run `doit fingerprint:{name}`"
    missing: list[str] = []
    if backend == "tensorrt":
        if fp.get("kind") not in ("jetson", "gpu"):
            raise ProbeError(f"target {name} has backend = \"tensorrt\" but no NVIDIA GPU was found "
                             "(no Jetson identity files, no nvidia-smi GPU)", target=target,
                             hint=f"use backend = \"onnxruntime\" for this target, or check the NVIDIA "
                                  f"driver/JetPack on it; {rerun}")
        if not (fp.get("module") or fp.get("board_model") or fp.get("gpu_name")):
            missing.append("GPU model unknown (no device-tree model or nvidia-smi name)")
        if not fp.get("tensorrt"):
            missing.append("TensorRT not found (no libnvinfer deb, NvInferVersion.h, python tensorrt or trtexec)")
        if not fp.get("compute_capability"):
            missing.append("compute capability unknown (nvidia-smi has no compute_cap and the GPU is not "
                           "in the tables)")
        if fp.get("kind") == "jetson" and not fp.get("l4t"):
            missing.append("L4T version unknown (no /etc/nv_tegra_release, no nvidia-l4t-core deb)")
        hint = (f"install TensorRT on the target (JetPack's nvidia-tensorrt / the libnvinfer debs, with "
                f"trtexec) or use backend = \"onnxruntime\"; {rerun}")
    else:
        if not fp.get("onnxruntime"):
            missing.append("ONNX Runtime not found in the target's python")
        hint = f"install onnxruntime for the target's python (or set its `python`); {rerun}"
    if missing:
        raise ProbeError(f"target {name}: fingerprint lacks what a {backend} hardware class needs: "
                         + "; ".join(missing), target=target, hint=hint)


def hardware_class(backend: str, fingerprint: Mapping, extra_fields: tuple[str, ...] = (), *,
                   target: str | None = None) -> HardwareClass:
    """The class of `fingerprint` for `backend`; ProbeError (require_class_fields) if it lacks what
    that backend's class needs."""
    require_class_fields(backend, fingerprint, target)
    names = sorted(set(CLASS_FIELDS[backend]) | set(extra_fields))
    fields = {name: fingerprint.get(name) for name in names}
    return HardwareClass(backend, fields, digest({"backend": backend, "fields": fields}))


def class_or_none(target, fingerprint: Mapping) -> HardwareClass | None:
    """The class of `target` (a kiln.config.Target) by `fingerprint`; None if it forms none."""
    from kiln.errors import ProbeError
    try:
        return hardware_class(target.backend, fingerprint, tuple(target.class_fields))
    except ProbeError:
        return None


def describe_change(old: Mapping | None, new: Mapping, backend: str,
                    extra_fields: tuple[str, ...] = ()) -> list[str]:
    """Human lines for what moved a device to another class, e.g. "TensorRT 8.5.2 → 10.3.0"."""
    names = sorted(set(CLASS_FIELDS[backend]) | set(extra_fields))
    if not old:
        return ["first probe: " + ", ".join(f"{LABELS.get(n, n)} {_show(new.get(n))}" for n in names
                                            if new.get(n) is not None)]
    lines = []
    for n in names:
        a, b = old.get(n), new.get(n)
        if a == b:
            continue
        if isinstance(a, list) or isinstance(b, list):
            before, after = set(a or []), set(b or [])
            if before == after:
                continue
            parts = [f"+{f}" for f in sorted(after - before)] + [f"-{f}" for f in sorted(before - after)]
            lines.append(f"{LABELS.get(n, n)} " + " ".join(parts))
        else:
            lines.append(f"{LABELS.get(n, n)} {_show(a)} → {_show(b)}")
    return lines


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(value) or "-"
    return "-" if value is None else str(value)
