"""Hardware classes: devices that can share one engine.

A backend names the fingerprint fields an engine is married to; the digest of
those fields (plus any extra fields a target asks for) is the class. Identical
devices share a class, so a fleet pays for one build per class.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from kiln.keys import digest

# backend -> fingerprint fields that decide engine compatibility
CLASS_FIELDS = {
    "onnxruntime": ("arch", "cpu_flags", "onnxruntime"),
    "tensorrt": ("module", "board_model", "gpu_name", "compute_capability", "tensorrt", "cuda", "cudnn", "l4t"),
}
LABELS = {"tensorrt": "TensorRT", "cuda": "CUDA", "cudnn": "cuDNN", "l4t": "L4T", "onnxruntime": "ONNX Runtime",
          "compute_capability": "compute capability", "cpu_flags": "CPU ISA", "board_model": "board",
          "gpu_name": "GPU", "power_mode": "power mode"}


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
            isa = next((x for x in ("avx512f", "avx2", "avx", "sve2", "sve", "asimd") if x in (f.get("cpu_flags") or [])), "base")
            text = f"cpu-{f.get('arch')}-{isa}-ort{f.get('onnxruntime')}"
        else:
            device = f.get("module") or f.get("board_model") or f.get("gpu_name") or "gpu"
            text = f"{device}-sm{f.get('compute_capability')}-trt{f.get('tensorrt')}"
        return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower()[:48]


def hardware_class(backend: str, fingerprint: dict, extra_fields: tuple[str, ...] = ()) -> HardwareClass:
    names = sorted(set(CLASS_FIELDS[backend]) | set(extra_fields))
    fields = {name: fingerprint.get(name) for name in names}
    return HardwareClass(backend, fields, digest({"backend": backend, "fields": fields}))


def describe_change(old: dict | None, new: dict, backend: str, extra_fields: tuple[str, ...] = ()) -> list[str]:
    """Human lines for what moved a device to another class, e.g. "tensorrt 8.5.2 → 10.3.0"."""
    names = sorted(set(CLASS_FIELDS[backend]) | set(extra_fields))
    if not old:
        return ["first probe: " + ", ".join(f"{LABELS.get(n, n)} {_show(new.get(n))}" for n in names
                                            if new.get(n) is not None)]
    return [f"{LABELS.get(n, n)} {_show(old.get(n))} → {_show(new.get(n))}" for n in names if old.get(n) != new.get(n)]


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(value) or "-"
    return "-" if value is None else str(value)
