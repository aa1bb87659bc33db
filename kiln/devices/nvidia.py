"""Pure parsers of what NVIDIA devices print or keep in files, and the lookup tables they need.

Every function here is text in, data out: no I/O, no subprocess. Raw strings are
kept next to parsed values. The formats, version sources and tables are the ones
documented, with their sources, in docs/devices.md (cited as "§N"). The probe
script that collects these texts is kiln.devices.probe_script; the assembly of a
whole fingerprint (and the precedence between sources) is kiln.devices.fingerprint.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = [
    "TegraRelease", "parse_nv_tegra_release", "parse_device_tree_model",
    "parse_device_tree_compatible", "module_from_compatible", "soc_from_compatible", "jetson_dla_cores", "dla_cores",
    "parse_dpkg_versions", "deb_upstream_version", "dpkg_tensorrt", "dpkg_cudnn", "dpkg_cuda",
    "parse_cuda_version_json", "parse_cuda_version_txt", "parse_nvcc_version", "parse_c_defines",
    "parse_cudnn_header", "parse_nvinfer_version_header", "parse_trtexec_banner",
    "decode_trt_version_number", "parse_python_tensorrt_version", "parse_nvpmodel",
    "SMI_FIELDS", "SMI_FIELDS_NO_CC", "GpuRow", "parse_nvidia_smi", "jetpack_for_l4t",
    "jetson_compute_capability", "gpu_compute_capability", "truncate_version", "clean_value",
]

# --------------------------------------------------------------------------- helpers

_VERSION = re.compile(r"(\d+(?:\.\d+)*)")


def truncate_version(version: str | None, parts: int) -> str | None:
    """Leading `parts` numeric components: ("12.6.20241114", 2) -> "12.6"; None if none."""
    if not version:
        return None
    m = _VERSION.match(version.strip())
    if not m:
        return None
    return ".".join(m.group(1).split(".")[:parts])


def clean_value(value: str | None) -> str | None:
    """nvidia-smi and friends say "[N/A]" / "Not Supported" for unknown."""
    if value is None:
        return None
    value = value.strip()
    if not value or value in ("[N/A]", "N/A", "Not Supported", "[Not Supported]"):
        return None
    return value


# --------------------------------------------------------------------------- Jetson identity

@dataclass(frozen=True)
class TegraRelease:
    l4t: str            # "35.4.1"
    release: str        # "R35"
    revision: str       # "4.1"
    board: str | None   # "t186ref"
    gcid: str | None
    raw: str            # line 1 verbatim


_TEGRA = re.compile(r"#\s*R(?P<major>\d+)\s*\((?P<kind>[^)]*)\)\s*,\s*REVISION:\s*(?P<rev>[\d.]+)(?P<rest>.*)")


def parse_nv_tegra_release(text: str) -> TegraRelease | None:
    """/etc/nv_tegra_release: `# R35 (release), REVISION: 4.1, GCID: ..., BOARD: t186ref, ...`.

    L4T = R<major> + "." + REVISION (docs/devices.md §1). Extra R36 lines (KERNEL_VARIANT,
    TARGET_USERSPACE_LIB_DIR) are ignored. None if no release line is found.
    """
    for line in text.splitlines():
        m = _TEGRA.search(line)
        if not m:
            continue
        fields = dict(re.findall(r"(\w+):\s*([^,]+)", m.group("rest")))
        rev = m.group("rev").rstrip(".")
        return TegraRelease(l4t=f"{m.group('major')}.{rev}", release=f"R{m.group('major')}",
                            revision=rev, board=clean_value(fields.get("BOARD")),
                            gcid=clean_value(fields.get("GCID")), raw=line.strip())
    return None


def parse_device_tree_model(data: str) -> str | None:
    """/proc/device-tree/model is NUL-terminated (the probe turns NULs into newlines)."""
    text = data.replace("\x00", "\n").strip()
    return text.splitlines()[0].strip() if text else None


def parse_device_tree_compatible(data: str) -> list[str]:
    """/proc/device-tree/compatible: NUL-separated, most specific first."""
    return [e.strip() for e in re.split(r"[\x00\n]", data) if e.strip()]


# Module ids (docs/devices.md §1, sources [JS][JG]). Key: "pNNNN" or "pNNNN-NNNN".
_MODULES = {
    "p3767-0000": "Jetson Orin NX 16GB",
    "p3767-0001": "Jetson Orin NX 8GB",
    "p3767-0003": "Jetson Orin Nano 8GB",
    "p3767-0004": "Jetson Orin Nano 4GB",
    "p3767-0005": "Jetson Orin Nano Developer Kit",
    "p3701": "Jetson AGX Orin",
    "p3668": "Jetson Xavier NX",
    "p2888": "Jetson AGX Xavier",
    "p2972-0000": "Jetson AGX Xavier",
    "p3448": "Jetson Nano",
    "p3450-0000": "Jetson Nano",
}
_MODULE_ID = re.compile(r"\b(p\d{4})-(\d{4})(-super)?\b")


def module_from_compatible(entries: Sequence[str]) -> tuple[str | None, str | None]:
    """(module id, module name) from compatible entries.

    Carrier+module entries (`nvidia,p3768-0000+p3767-0005`) name the module after
    the `+`; a known module id wins over an unknown one. Returns (id, None) for an
    id we do not know, (None, None) when there is none.
    """
    fallback = None
    for entry in entries:
        candidates = entry.split("+")[::-1]   # module part first
        for part in candidates:
            m = _MODULE_ID.search(part)
            if not m:
                continue
            mid = f"{m.group(1)}-{m.group(2)}"
            name = _MODULES.get(mid) or _MODULES.get(m.group(1))
            if name:
                super_ = m.group(3) is not None
                return mid + ("-super" if super_ else ""), name + (" Super" if super_ else "")
            fallback = fallback or mid
    return fallback, None


# DLA cores per module (docs/devices.md §9): Xavier and AGX Orin have two, Orin NX 8GB one, the
# Orin Nano none (fused off); key as _MODULES. Modules not listed: unknown (None).
_DLA_CORES = {
    "p3767-0000": 2, "p3767-0001": 1, "p3767-0003": 0, "p3767-0004": 0, "p3767-0005": 0,
    "p3701": 2, "p3668": 2, "p2888": 2, "p2972-0000": 2, "p3448": 0, "p3450-0000": 0,
}


def jetson_dla_cores(module: str | None) -> int | None:
    """How many DLA cores the Jetson module `module` (e.g. "p3767-0005", "p3701-0005") has, None
    if it is not a module we know (a discrete GPU has none: its fingerprint has no module)."""
    m = _MODULE_ID.search(module or "")
    if not m:
        return None
    mid = f"{m.group(1)}-{m.group(2)}"
    found = _DLA_CORES.get(mid, _DLA_CORES.get(m.group(1)))
    return found


def dla_cores(fingerprint: dict) -> int | None:
    """DLA cores of a device by its fingerprint: a Jetson's by its module; 0 for a discrete GPU."""
    if fingerprint.get("kind") == "gpu":
        return 0
    return jetson_dla_cores(fingerprint.get("module"))


_SOCS = ("tegra264", "tegra234", "tegra194", "tegra186", "tegra210")


def soc_from_compatible(entries: Sequence[str]) -> str | None:
    for entry in entries:
        for soc in _SOCS:
            if entry.endswith("," + soc) or entry == soc:
                return soc
    return None


# --------------------------------------------------------------------------- dpkg

def parse_dpkg_versions(text: str) -> dict[str, str]:
    """`dpkg-query -W -f='${Package} ${Version}\\n'` lines -> {package: version}.

    Also accepts the probe's `${db:Status-Abbrev}|${Package} ${Version}` form and
    keeps only installed packages (second status letter "i"), so a removed
    libnvinfer8 with leftover config ("rc") does not count.
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        status = None
        if "|" in line:
            status, line = line.split("|", 1)
        parts = line.split()
        if len(parts) < 2:
            continue
        if status is not None and (len(status) < 2 or status[1] != "i"):
            continue
        out[parts[0]] = parts[1]
    return out


def deb_upstream_version(version: str | None) -> str | None:
    """`35.4.1-20230801124926` -> 35.4.1; `6.2.1+b38` / `5.1.2-b104` -> 6.2.1 / 5.1.2;
    `8.5.2-1+cuda11.4` -> 8.5.2; `2:1.2-3` -> 1.2."""
    if not version:
        return None
    v = version.split(":", 1)[-1]
    v = re.split(r"[-+~]", v, 1)[0]
    return v or None


def dpkg_tensorrt(pkgs: Mapping[str, str]) -> str | None:
    for name in sorted((p for p in pkgs if re.fullmatch(r"libnvinfer\d+", p)), reverse=True,
                       key=lambda p: int(p[len("libnvinfer"):])):
        return deb_upstream_version(pkgs[name])
    return None


def dpkg_cudnn(pkgs: Mapping[str, str]) -> str | None:
    names = [p for p in pkgs if re.fullmatch(r"libcudnn(\d+)(-cuda-\d+)?", p)]
    names.sort(key=lambda p: int(re.match(r"libcudnn(\d+)", p).group(1)), reverse=True)
    return truncate_version(deb_upstream_version(pkgs[names[0]]), 3) if names else None


def dpkg_cuda(pkgs: Mapping[str, str]) -> str | None:
    names = [p for p in pkgs if re.fullmatch(r"cuda-toolkit-\d+-\d+", p)]
    if not names:
        return None
    names.sort(key=lambda p: tuple(int(x) for x in p.split("-")[2:]), reverse=True)
    return deb_upstream_version(pkgs[names[0]])


# --------------------------------------------------------------------------- CUDA / cuDNN / TRT

def parse_cuda_version_json(text: str) -> tuple[str | None, str | None]:
    """/usr/local/cuda/version.json -> (best version, date-stamped "cuda" version).

    Prefers cuda_cudart, then cuda_nvcc (docs/devices.md §2: `cuda.version` can be
    `12.6.20241114`). The second value is the raw `cuda.version`, for fallback.
    """
    try:
        data = json.loads(text)
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None

    def version_of(key: str) -> str | None:
        entry = data.get(key)
        return clean_value(entry.get("version")) if isinstance(entry, dict) and isinstance(entry.get("version"), str) else None

    return version_of("cuda_cudart") or version_of("cuda_nvcc"), version_of("cuda")


def parse_cuda_version_txt(text: str) -> str | None:
    """JP4's /usr/local/cuda/version.txt: `CUDA Version 10.2.300`."""
    m = re.search(r"CUDA Version\s+(\d+(?:\.\d+)+)", text)
    return m.group(1) if m else None


def parse_nvcc_version(text: str) -> str | None:
    """`Cuda compilation tools, release 12.6, V12.6.68` -> 12.6.68 (or 12.6)."""
    m = re.search(r"release\s+(\d+\.\d+)(?:,\s*V(\d+(?:\.\d+)+))?", text)
    if not m:
        return None
    return m.group(2) or m.group(1)


_BLOCK_COMMENT = re.compile(r"/\*.*?\*/", re.S)
_DEFINE = re.compile(r"[ \t]*#[ \t]*define[ \t]+([A-Za-z_]\w*)(\()?(.*)")


def parse_c_defines(text: str) -> dict[str, str]:
    """Object-like `#define NAME value` macros of a C header -> {NAME: value} ("" for no value).

    Reads whole real headers (docs/devices.md §5): include guards (`#define
    CUDNN_VERSION_H_` has no value, and a blank line follows it), `/* */` and `//`
    comments (also after a value: `#define NV_TENSORRT_MAJOR 10 //!< ...`), blank
    lines, backslash continuations. Each define is read within its own logical line,
    so a valueless guard never swallows the next line. Function-like macros are
    skipped. A `/*` left open (a header cut to its #define lines) ends at its line.
    """
    text = _BLOCK_COMMENT.sub(" ", text.replace("\r\n", "\n"))
    text = re.sub(r"\\\n", " ", text)                       # line continuations
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("//", 1)[0].split("/*", 1)[0]
        m = _DEFINE.match(line)
        if m and not m.group(2):
            out.setdefault(m.group(1), m.group(3).strip())
    return out


def _resolve(defs: Mapping[str, str], name: str) -> int | None:
    """Integer value of macro `name`, following macro-to-macro chains
    (TRT 10.11+: `NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE`); None for expressions and loops."""
    seen = set()
    value = defs.get(name)
    while value is not None:
        value = value.strip()
        while value.startswith("(") and value.endswith(")"):
            value = value[1:-1].strip()
        m = re.fullmatch(r"(-?\d+)[uUlL]*", value)
        if m:
            return int(m.group(1))
        if not re.fullmatch(r"[A-Za-z_]\w*", value) or value in seen:
            return None
        seen.add(value)
        value = defs.get(value)
    return None


def parse_cudnn_header(text: str) -> str | None:
    """cudnn_version.h / cudnn_version_v8.h / _v9.h (whole file): CUDNN_MAJOR/MINOR/PATCHLEVEL
    -> "9.14.0"; None unless all three are integers (docs/devices.md §2, §5)."""
    defs = parse_c_defines(text)
    parts = [_resolve(defs, k) for k in ("CUDNN_MAJOR", "CUDNN_MINOR", "CUDNN_PATCHLEVEL")]
    return ".".join(map(str, parts)) if None not in parts else None


def parse_nvinfer_version_header(text: str) -> str | None:
    """NvInferVersion.h (whole file) -> "8.5.2.2"; resolves the 10.11+
    `NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE` form (docs/devices.md §2, §5)."""
    defs = parse_c_defines(text)
    parts = [_resolve(defs, f"NV_TENSORRT_{k}") for k in ("MAJOR", "MINOR", "PATCH", "BUILD")]
    if None in parts[:3]:
        return None
    return ".".join(str(p) for p in parts if p is not None)


_BANNER = re.compile(r"\[TensorRT v(\d+)\](?:\s*\[b(\d+)\])?")


def decode_trt_version_number(number: int) -> str:
    """NV_TENSORRT_VERSION-style number: 8502 -> 8.5.2 (M*1000+m*100+p in 8.x),
    100300 -> 10.3.0 (M*10000+m*100+p from 10.x)."""
    major = number // 10000 if number >= 10000 else number // 1000
    rest = number - major * (10000 if number >= 10000 else 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def parse_trtexec_banner(text: str) -> tuple[str | None, str | None]:
    """`[TensorRT v8502]` -> ("8.5.2", None); `[TensorRT v100800] [b43]` -> ("10.8.0", "43").
    Falls back to the `[I] TensorRT version: 8.5.2` line."""
    m = _BANNER.search(text)
    if m:
        return decode_trt_version_number(int(m.group(1))), m.group(2)
    m = re.search(r"TensorRT version:\s*(\d+(?:\.\d+)+)", text)
    return (m.group(1), None) if m else (None, None)


def parse_python_tensorrt_version(text: str) -> str | None:
    """`tensorrt.__version__`: "8.5.2.2" (JP5), "10.3.0" (JP6)."""
    m = _VERSION.search(text.strip())
    return m.group(1) if m and "." in m.group(1) else None


def parse_nvpmodel(text: str) -> tuple[str | None, str | None]:
    """`nvpmodel -q`: `NV Power Mode: MAXN` then the id on its own line -> ("MAXN", "0")."""
    m = re.search(r"NV Power Mode:\s*(\w+)", text)
    if not m:
        return None, None
    after = text[m.end():]
    ident = re.search(r"^\s*(\d+)\s*$", after, re.M)
    return m.group(1), ident.group(1) if ident else None


# --------------------------------------------------------------------------- nvidia-smi

SMI_FIELDS = ("name", "compute_cap", "driver_version", "memory.total", "pci.device_id")
SMI_FIELDS_NO_CC = ("name", "driver_version", "memory.total", "pci.device_id")


@dataclass(frozen=True)
class GpuRow:
    name: str | None
    compute_cap: str | None
    driver_version: str | None
    memory_mib: str | None
    pci_device_id: str | None
    raw: str


def parse_nvidia_smi(text: str, fields: Sequence[str] = SMI_FIELDS) -> list[GpuRow]:
    """`nvidia-smi --query-gpu=<fields> --format=csv,noheader` -> one row per GPU.

    Tolerates a header line, ` MiB` units and `[N/A]`/`Not Supported`. The
    exit-2 `Field "compute_cap" is not a valid field to query.` text yields [].
    """
    rows = []
    for line in text.splitlines():
        if not line.strip() or "not a valid field" in line or line.startswith("name,"):
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(fields):
            continue
        cell = dict(zip(fields, cells))
        mem = clean_value(cell.get("memory.total"))
        mem_m = re.match(r"(\d+)", mem) if mem else None
        rows.append(GpuRow(name=clean_value(cell.get("name")), compute_cap=clean_value(cell.get("compute_cap")),
                           driver_version=clean_value(cell.get("driver_version")),
                           memory_mib=mem_m.group(1) if mem_m else None,
                           pci_device_id=clean_value(cell.get("pci.device_id")), raw=line.strip()))
    return rows


# --------------------------------------------------------------------------- tables

# L4T -> JetPack (docs/devices.md §1). Rival answers map to "ambiguous".
_JETPACK = {
    "35.1.0": "5.0.2", "35.2.1": "5.1", "35.3.0": "5.1.1 PRE", "35.3.1": "5.1.1",
    "35.4.1": "5.1.2", "35.5.0": "5.1.3", "35.6.0": "5.1.4",
    "35.6.1": "ambiguous", "35.6.2": "ambiguous", "35.6.3": "ambiguous",  # all "5.1.5" per JS
    "35.6.4": "5.1.6",
    "36.2.0": "6.0 DP", "36.3.0": "6.0",
    "36.4.0": "6.1", "36.4.2": "ambiguous",  # 6.1 rev1 [JS] vs 6.1.1 [JC]
    "36.4.3": "6.2", "36.4.4": "6.2.1", "36.4.7": "6.2.1",
    # 32.7.1: JS says 4.6.1, a public gist pairs it with 4.6.2
    "32.7.1": "ambiguous",
}


def jetpack_for_l4t(l4t: str | None) -> str | None:
    """JetPack for an L4T version: a version, "ambiguous" when sources disagree, None if unknown."""
    if not l4t:
        return None
    if l4t in _JETPACK:
        return _JETPACK[l4t]
    m = re.fullmatch(r"32\.7\.([2-6])", l4t)
    return f"4.6.{m.group(1)}" if m else None


_SOC_FAMILY = {"tegra210": "nano", "tegra186": "tx2", "tegra194": "xavier", "tegra234": "orin",
               "tegra264": "thor"}
_FAMILY_CC = {"nano": "5.3", "tx2": "6.2", "xavier": "7.2", "orin": "8.7"}


def _jetson_family(*names: str | None, soc: str | None = None) -> str | None:
    text = " ".join(n for n in names if n).lower()
    for family in ("thor", "orin", "xavier", "tx2", "nano"):
        if family in text:
            return family
    return _SOC_FAMILY.get(soc or "")


def jetson_compute_capability(board_model: str | None, module_name: str | None = None,
                              soc: str | None = None, cuda: str | None = None) -> str | None:
    """Orin 8.7, Xavier 7.2, Nano 5.3, TX2 6.2 (docs/devices.md §4). Thor is 10.1 with CUDA <= 12.9
    and 11.0 with CUDA >= 13, so it is None while CUDA is unknown."""
    family = _jetson_family(module_name, board_model, soc=soc)
    if family == "thor":
        major = truncate_version(cuda, 1)
        return None if major is None else ("11.0" if int(major) >= 13 else "10.1")
    return _FAMILY_CC.get(family or "")


# Discrete GPUs that drivers without `compute_cap` (e.g. 470.x) still drive. Values
# from NVIDIA's CUDA GPU list (developer.nvidia.com/cuda-gpus; docs/devices.md §4).
_GPU_CC = {
    "tesla k80": "3.7", "tesla p4": "6.1", "tesla p40": "6.1", "tesla p100-pcie-16gb": "6.0",
    "tesla v100-sxm2-16gb": "7.0", "tesla v100-sxm2-32gb": "7.0", "tesla v100-pcie-16gb": "7.0",
    "tesla t4": "7.5", "nvidia a100-sxm4-40gb": "8.0", "nvidia a100-pcie-40gb": "8.0",
    "nvidia a10": "8.6", "nvidia a10g": "8.6", "nvidia geforce rtx 3090": "8.6",
    "geforce rtx 2080 ti": "7.5", "nvidia geforce rtx 2080 ti": "7.5",
}


def gpu_compute_capability(gpu_name: str | None) -> str | None:
    return _GPU_CC.get((gpu_name or "").strip().lower())

