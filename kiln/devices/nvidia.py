"""NVIDIA device facts: the device-side probe script and pure parsers for what it prints.

Everything here is a pure function from text to data (no I/O), except that
`PROBE_SCRIPT` is meant to be run on the device (`probe_argv()` builds the argv).
Raw strings are kept next to parsed values. Sources and their formats are the
ones in /work/shared/reference/tensorrt-jetson-facts.md (cited as "facts §N").

Fingerprint keys (`parse_probe_output`); every value is a string or None (unknown):

=====================  ==========================================================
kind                   "jetson" | "gpu" | "cpu"
arch                   `uname -m` (aarch64, x86_64)
cpu_model              /proc/cpuinfo "model name" of CPU 0 (ARM fallback: implementer/part)
cpu_flags              ISA-relevant CPU flags of CPU 0, sorted, space-separated
board_model            /proc/device-tree/model (NUL stripped), e.g. "NVIDIA Jetson AGX Orin Developer Kit"
module                 Jetson module id from device-tree compatible, e.g. "p3767-0005"
module_name            human name of `module`, e.g. "Jetson Orin Nano Developer Kit"
soc                    "tegra234" ... from compatible
l4t                    L4T version "35.4.1" (/etc/nv_tegra_release, else nvidia-l4t-core deb)
l4t_raw                first line of /etc/nv_tegra_release (or the l4t-core deb version)
l4t_board              BOARD field of nv_tegra_release (not the SoC: Orin says t186ref)
jetpack                "5.1.2": nvidia-jetpack deb if installed, else mapped from L4T;
                       "ambiguous" when the mapping has rival answers; None if unknown
jetpack_source         "dpkg" | "l4t" | None
jetpack_raw            nvidia-jetpack deb version as printed ("6.2.1+b38")
gpu_name               nvidia-smi name of GPU 0 (JP6 Jetson: "Orin (nvgpu)")
gpu_count              number of GPUs nvidia-smi listed
gpu_memory_mib         memory.total of GPU 0 in MiB, None when "[N/A]"/"Not Supported"
gpu_pci_device_id      pci.device_id raw ("0x1EB810DE")
driver_version         nvidia-smi driver_version
compute_capability     "8.7": nvidia-smi compute_cap, else Jetson SoC table, else GPU name table
compute_capability_source  "nvidia-smi" | "jetson-table" | "gpu-table" | None
tensorrt               TensorRT major.minor.patch ("8.5.2") — the class-relevant form
tensorrt_build         the longest version seen from the winning-or-agreeing sources ("8.5.2.2")
cuda                   CUDA major.minor ("12.6")
cuda_full              CUDA version from the winning source ("12.6.68")
cudnn                  cuDNN major.minor.patch ("8.6.0")
power_mode             nvpmodel name ("MAXN")
power_mode_id          nvpmodel id ("0")
onnxruntime            onnxruntime.__version__ of the device's python3
python                 device python3 version ("3.10.12")
version_conflicts      "tensorrt: dpkg=8.5.2 python=8.6.1; ..." when sources disagree, else None
=====================  ==========================================================

Version precedence when sources disagree (the first present wins; the losers are
reported in `version_conflicts`, compared at the precision of the key):
  l4t:       /etc/nv_tegra_release > nvidia-l4t-core deb
  tensorrt:  libnvinfer deb (the installed runtime library) > NvInferVersion.h >
             python tensorrt.__version__ > trtexec banner > "tensorrt" meta deb
  cuda:      version.json cuda_cudart > version.json cuda_nvcc > nvcc --version >
             version.txt > cuda-toolkit-X-Y deb > version.json "cuda" (date-stamped patch dropped)
  cudnn:     cudnn_version header > libcudnn deb
  jetpack:   nvidia-jetpack deb > L4T mapping (they upgrade separately, facts §1)
  compute capability: nvidia-smi > Jetson SoC table > discrete GPU name table
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from kiln.errors import ProbeError

__all__ = [
    "PROBE_SCRIPT", "PROBE_FORMAT", "probe_argv", "parse_probe_output", "split_sections",
    "FINGERPRINT_KEYS", "TegraRelease", "parse_nv_tegra_release", "parse_device_tree_model",
    "parse_device_tree_compatible", "module_from_compatible", "soc_from_compatible",
    "parse_dpkg_versions", "deb_upstream_version", "parse_cuda_version_json",
    "parse_cuda_version_txt", "parse_nvcc_version", "parse_cudnn_header",
    "parse_nvinfer_version_header", "parse_trtexec_banner", "decode_trt_version_number", "parse_python_tensorrt_version",
    "parse_nvpmodel", "GpuRow", "parse_nvidia_smi", "jetpack_for_l4t",
    "jetson_compute_capability", "gpu_compute_capability", "tensorrt_class_fields",
    "describe_drift", "TENSORRT_CLASS_KEYS",
]

# --------------------------------------------------------------------------- helpers

_VERSION = re.compile(r"(\d+(?:\.\d+)*)")


def _truncate(version: str | None, parts: int) -> str | None:
    if not version:
        return None
    m = _VERSION.match(version.strip())
    if not m:
        return None
    return ".".join(m.group(1).split(".")[:parts])


def _clean(value: str | None) -> str | None:
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

    L4T = R<major> + "." + REVISION (facts §1). Extra R36 lines (KERNEL_VARIANT,
    TARGET_USERSPACE_LIB_DIR) are ignored. None if no release line is found.
    """
    for line in text.splitlines():
        m = _TEGRA.search(line)
        if not m:
            continue
        fields = dict(re.findall(r"(\w+):\s*([^,]+)", m.group("rest")))
        rev = m.group("rev").rstrip(".")
        return TegraRelease(l4t=f"{m.group('major')}.{rev}", release=f"R{m.group('major')}",
                            revision=rev, board=_clean(fields.get("BOARD")),
                            gcid=_clean(fields.get("GCID")), raw=line.strip())
    return None


def parse_device_tree_model(data: str) -> str | None:
    """/proc/device-tree/model is NUL-terminated (the probe turns NULs into newlines)."""
    text = data.replace("\x00", "\n").strip()
    return text.splitlines()[0].strip() if text else None


def parse_device_tree_compatible(data: str) -> list[str]:
    """/proc/device-tree/compatible: NUL-separated, most specific first."""
    return [e.strip() for e in re.split(r"[\x00\n]", data) if e.strip()]


# Module ids [JS][JG] (facts §1). Key: "pNNNN" or "pNNNN-NNNN".
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


def _dpkg_tensorrt(pkgs: Mapping[str, str]) -> str | None:
    for name in sorted((p for p in pkgs if re.fullmatch(r"libnvinfer\d+", p)), reverse=True,
                       key=lambda p: int(p[len("libnvinfer"):])):
        return deb_upstream_version(pkgs[name])
    return None


def _dpkg_cudnn(pkgs: Mapping[str, str]) -> str | None:
    names = [p for p in pkgs if re.fullmatch(r"libcudnn(\d+)(-cuda-\d+)?", p)]
    names.sort(key=lambda p: int(re.match(r"libcudnn(\d+)", p).group(1)), reverse=True)
    return _truncate(deb_upstream_version(pkgs[names[0]]), 3) if names else None


def _dpkg_cuda(pkgs: Mapping[str, str]) -> str | None:
    names = [p for p in pkgs if re.fullmatch(r"cuda-toolkit-\d+-\d+", p)]
    if not names:
        return None
    names.sort(key=lambda p: tuple(int(x) for x in p.split("-")[2:]), reverse=True)
    return deb_upstream_version(pkgs[names[0]])


# --------------------------------------------------------------------------- CUDA / cuDNN / TRT

def parse_cuda_version_json(text: str) -> tuple[str | None, str | None]:
    """/usr/local/cuda/version.json -> (best version, date-stamped "cuda" version).

    Prefers cuda_cudart, then cuda_nvcc (facts §2: `cuda.version` can be
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
        return _clean(entry.get("version")) if isinstance(entry, dict) and isinstance(entry.get("version"), str) else None

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


def _defines(text: str) -> dict[str, str]:
    return dict(re.findall(r"^\s*#\s*define\s+(\w+)\s+(\S+)", text, re.M))


def _resolve(defs: Mapping[str, str], name: str) -> int | None:
    seen = set()
    value = defs.get(name)
    while value is not None and not value.lstrip("-").isdigit():
        if value in seen:
            return None
        seen.add(value)
        value = defs.get(value)
    return int(value) if value is not None else None


def parse_cudnn_header(text: str) -> str | None:
    """cudnn_version.h / cudnn_version_v8.h / _v9.h: CUDNN_MAJOR/MINOR/PATCHLEVEL."""
    defs = _defines(text)
    parts = [_resolve(defs, k) for k in ("CUDNN_MAJOR", "CUDNN_MINOR", "CUDNN_PATCHLEVEL")]
    return ".".join(map(str, parts)) if None not in parts else None


def parse_nvinfer_version_header(text: str) -> str | None:
    """NvInferVersion.h -> "8.5.2.2"; resolves the 10.11+ `NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE` form."""
    defs = _defines(text)
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
        mem = _clean(cell.get("memory.total"))
        mem_m = re.match(r"(\d+)", mem) if mem else None
        rows.append(GpuRow(name=_clean(cell.get("name")), compute_cap=_clean(cell.get("compute_cap")),
                           driver_version=_clean(cell.get("driver_version")),
                           memory_mib=mem_m.group(1) if mem_m else None,
                           pci_device_id=_clean(cell.get("pci.device_id")), raw=line.strip()))
    return rows


# --------------------------------------------------------------------------- tables

# L4T -> JetPack (facts §1). Rival answers map to "ambiguous".
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
    """Orin 8.7, Xavier 7.2, Nano 5.3, TX2 6.2 (facts §1). Thor is 10.1 with CUDA <= 12.9
    and 11.0 with CUDA >= 13, so it is None while CUDA is unknown."""
    family = _jetson_family(module_name, board_model, soc=soc)
    if family == "thor":
        major = _truncate(cuda, 1)
        return None if major is None else ("11.0" if int(major) >= 13 else "10.1")
    return _FAMILY_CC.get(family or "")


# Discrete GPUs that drivers without `compute_cap` (e.g. 470.x) still drive. Values
# from NVIDIA's CUDA GPU list (developer.nvidia.com/cuda-gpus); not in the fact sheet.
_GPU_CC = {
    "tesla k80": "3.7", "tesla p4": "6.1", "tesla p40": "6.1", "tesla p100-pcie-16gb": "6.0",
    "tesla v100-sxm2-16gb": "7.0", "tesla v100-sxm2-32gb": "7.0", "tesla v100-pcie-16gb": "7.0",
    "tesla t4": "7.5", "nvidia a100-sxm4-40gb": "8.0", "nvidia a100-pcie-40gb": "8.0",
    "nvidia a10": "8.6", "nvidia a10g": "8.6", "nvidia geforce rtx 3090": "8.6",
    "geforce rtx 2080 ti": "7.5", "nvidia geforce rtx 2080 ti": "7.5",
}


def gpu_compute_capability(gpu_name: str | None) -> str | None:
    return _GPU_CC.get((gpu_name or "").strip().lower())


# --------------------------------------------------------------------------- probe script

PROBE_FORMAT = "1"

#: POSIX sh; needs only sh, cat, tr, uname (and uses dpkg-query, nvidia-smi, nvpmodel,
#: nvcc, trtexec, python3 when present). Never fails: missing sources are just absent.
#: Args: $1 = trtexec path (default /usr/src/tensorrt/bin/trtexec), $2 = python (default python3).
#: Env KILN_PROBE_ROOT prefixes every *file* path (tests run it against a fake root).
PROBE_SCRIPT = r"""
R="${KILN_PROBE_ROOT:-}"
TRTEXEC="${1:-${KILN_TRTEXEC:-$R/usr/src/tensorrt/bin/trtexec}}"
PY="${2:-python3}"
begin() { printf '@@kiln:%s@@\n' "$1"; }
end() { printf '\n@@kiln:end@@\n'; }
have() { command -v "$1" >/dev/null 2>&1; }
file_section() { # name path [nul->newline]
  if [ -r "$2" ] && [ -f "$2" ]; then
    begin "$1"
    if [ -n "$3" ]; then tr '\000' '\n' < "$2" 2>/dev/null; else cat "$2" 2>/dev/null; fi
    end
  fi
}
defines_section() { # name path: only the #define lines
  begin "$1"
  while IFS= read -r l || [ -n "$l" ]; do
    case "$l" in *'#'*define*) printf '%s\n' "$l" ;; esac
  done < "$2"
  end
}
begin probe; printf '%s\n' "@FORMAT@"; end
begin uname_m; uname -m 2>/dev/null; end
if [ -r "$R/proc/cpuinfo" ]; then
  begin cpuinfo
  while IFS= read -r l; do [ -z "$l" ] && break; printf '%s\n' "$l"; done < "$R/proc/cpuinfo"
  end
fi
file_section nv_tegra_release "$R/etc/nv_tegra_release"
# /proc/device-tree is a symlink to /sys/firmware/devicetree/base; read either
for f in model compatible; do
  for dt in "$R/proc/device-tree" "$R/sys/firmware/devicetree/base"; do
    if [ -r "$dt/$f" ]; then file_section "dt_$f" "$dt/$f" nul; break; fi
  done
done
if have dpkg-query; then
  begin dpkg
  dpkg-query -W -f='${db:Status-Abbrev}|${Package} ${Version}\n' nvidia-l4t-core nvidia-jetpack \
    'libnvinfer[0-9]*' tensorrt python3-libnvinfer 'libcudnn[0-9]*' 'cuda-toolkit-[0-9]*' 2>/dev/null
  end
fi
file_section cuda_version_json "$R/usr/local/cuda/version.json"
file_section cuda_version_txt "$R/usr/local/cuda/version.txt"
NVCC="$R/usr/local/cuda/bin/nvcc"
[ -x "$NVCC" ] || NVCC="$(command -v nvcc 2>/dev/null)"
if [ -n "$NVCC" ] && [ -x "$NVCC" ]; then begin nvcc; "$NVCC" --version 2>&1 </dev/null; end; fi
for f in "$R"/usr/include/cudnn_version.h "$R"/usr/include/*-linux-gnu/cudnn_version_v9.h \
         "$R"/usr/include/*-linux-gnu/cudnn_version_v8.h "$R"/usr/local/cuda/include/cudnn_version.h; do
  if [ -r "$f" ]; then defines_section cudnn_header "$f"; break; fi
done
for f in "$R"/usr/include/*-linux-gnu/NvInferVersion.h "$R"/usr/include/NvInferVersion.h; do
  if [ -r "$f" ]; then defines_section nvinfer_header "$f"; break; fi
done
if [ -f "$TRTEXEC" ] && [ -x "$TRTEXEC" ]; then
  begin trtexec_banner
  "$TRTEXEC" --help 2>/dev/null </dev/null | while IFS= read -r l; do
    case "$l" in '&&&& RUNNING'*) printf '%s\n' "$l" ;; esac
  done
  end
fi
if have nvidia-smi; then
  smi_out="$(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,pci.device_id --format=csv,noheader 2>&1 </dev/null)"
  smi_rc=$?
  if [ "$smi_rc" -eq 0 ]; then
    begin nvidia_smi; printf '%s\n' "$smi_out"; end
  else
    case "$smi_out" in
      *'not a valid field'*)
        smi_retry="$(nvidia-smi --query-gpu=name,driver_version,memory.total,pci.device_id --format=csv,noheader 2>&1 </dev/null)" \
          && { begin nvidia_smi_nocc; printf '%s\n' "$smi_retry"; end; } ;;
    esac
    begin nvidia_smi_error; printf 'rc=%s\n%s\n' "$smi_rc" "$smi_out"; end
  fi
fi
if have nvpmodel; then begin nvpmodel; nvpmodel -q 2>/dev/null </dev/null; end; fi
if have "$PY"; then
  "$PY" - 2>/dev/null <<'KILN_PY' || true
import sys
print("@@kiln:python@@\n%d.%d.%d\n@@kiln:end@@" % sys.version_info[:3])
sys.stdout.flush()
for sec, mod in (("python_tensorrt", "tensorrt"), ("onnxruntime", "onnxruntime")):
    try:
        m = __import__(mod)
    except Exception:
        continue
    print("@@kiln:%s@@\n%s\n@@kiln:end@@" % (sec, getattr(m, "__version__", "")))
    sys.stdout.flush()
KILN_PY
fi
exit 0
""".replace("@FORMAT@", PROBE_FORMAT)


def probe_argv(trtexec: str | None = None, python: str = "python3") -> list[str]:
    """argv to run PROBE_SCRIPT through `Transport.run` (every element is quoted by the transport)."""
    return ["sh", "-c", PROBE_SCRIPT, "kiln-probe", trtexec or "", python]


_MARK = re.compile(r"^@@kiln:([a-z0-9_]+)@@$")


def split_sections(text: str) -> dict[str, str]:
    """Cut probe output into {section: text}; text has the end marker's padding newline removed."""
    sections: dict[str, str] = {}
    name, lines = None, []
    for line in text.splitlines():
        m = _MARK.match(line.strip())
        if m and m.group(1) == "end":
            if name is not None:
                body = "\n".join(lines)
                sections[name] = body[:-1] if body.endswith("\n") else body
            name, lines = None, []
        elif m and name is None:
            name, lines = m.group(1), []
        elif name is not None:
            lines.append(line)
    return sections


# --------------------------------------------------------------------------- fingerprint

FINGERPRINT_KEYS = (
    "kind", "arch", "cpu_model", "cpu_flags", "board_model", "module", "module_name", "soc",
    "l4t", "l4t_raw", "l4t_board", "jetpack", "jetpack_source", "jetpack_raw", "gpu_name",
    "gpu_count", "gpu_memory_mib", "gpu_pci_device_id", "driver_version", "compute_capability",
    "compute_capability_source", "tensorrt", "tensorrt_build", "cuda", "cuda_full", "cudnn",
    "power_mode", "power_mode_id", "onnxruntime", "python", "version_conflicts",
)

# Flags that change which kernels a CPU runtime may use (x86 and ARM spellings).
_ISA_FLAGS = frozenset("""
sse sse2 ssse3 sse4_1 sse4_2 sse4a avx avx2 fma f16c bmi1 bmi2 popcnt movbe aes pclmulqdq sha_ni
avx512f avx512cd avx512bw avx512dq avx512vl avx512ifma avx512vbmi avx512_vbmi2 avx512_vnni
avx512_bitalg avx512_vpopcntdq avx512_bf16 avx512_fp16 avx_vnni avx_vnni_int8 amx_tile amx_int8
amx_bf16 amx_fp16 vaes vpclmulqdq gfni
fp asimd asimdhp asimddp asimdfhm asimdrdm fphp sve sve2 i8mm bf16 svei8mm svebf16 sme atomics
""".split())


def _cpuinfo(text: str) -> tuple[str | None, str | None]:
    info: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info.setdefault(k.strip().lower(), v.strip())
    model = info.get("model name") or info.get("processor name") or info.get("cpu model")
    if not model and "cpu implementer" in info:
        model = f"ARM implementer {info['cpu implementer']} part {info.get('cpu part', '?')}"
    flags = (info.get("flags") or info.get("features") or "").split()
    isa = sorted(set(flags) & _ISA_FLAGS)
    return model or None, " ".join(isa) or None


def _pick(label: str, candidates: Iterable[tuple[str, str | None]], parts: int | None,
          conflicts: list[str]) -> tuple[str | None, str | None]:
    """First present candidate wins; returns (winner, longest agreeing form)."""
    present = [(src, v) for src, v in candidates if v]
    if not present:
        return None, None
    winner = present[0][1]
    cut = (lambda v: _truncate(v, parts)) if parts else (lambda v: v)
    agreeing = [v for _, v in present if cut(v) == cut(winner)]
    if len({cut(v) for _, v in present}) > 1:
        conflicts.append(f"{label}: " + " ".join(f"{s}={cut(v)}" for s, v in present))
    return cut(winner), max(agreeing, key=lambda v: len(v.split(".")))


def parse_probe_output(text: str) -> dict[str, str | None]:
    """PROBE_SCRIPT stdout -> flat fingerprint (keys: FINGERPRINT_KEYS, see the module doc).

    Raises ProbeError when the text holds no probe markers at all.
    """
    s = split_sections(text)
    if "probe" not in s and "uname_m" not in s:
        raise ProbeError("probe output has no @@kiln markers; the probe script did not run",
                         hint="run the probe with `sh -c PROBE_SCRIPT` on the target and check that sh exists",
                         output_head=text[:200] or "<empty>")
    fp: dict[str, str | None] = dict.fromkeys(FINGERPRINT_KEYS)
    conflicts: list[str] = []
    fp["arch"] = _clean(s.get("uname_m"))
    fp["cpu_model"], fp["cpu_flags"] = _cpuinfo(s.get("cpuinfo", ""))

    pkgs = parse_dpkg_versions(s.get("dpkg", ""))
    tegra = parse_nv_tegra_release(s.get("nv_tegra_release", ""))
    fp["board_model"] = parse_device_tree_model(s.get("dt_model", ""))
    compatible = parse_device_tree_compatible(s.get("dt_compatible", ""))
    fp["module"], fp["module_name"] = module_from_compatible(compatible)
    fp["soc"] = soc_from_compatible(compatible)

    core = pkgs.get("nvidia-l4t-core")
    fp["l4t"], _ = _pick("l4t", [("nv_tegra_release", tegra.l4t if tegra else None),
                                 ("dpkg", deb_upstream_version(core))], None, conflicts)
    fp["l4t_raw"] = tegra.raw if tegra else core
    fp["l4t_board"] = tegra.board if tegra else None
    fp["jetpack_raw"] = pkgs.get("nvidia-jetpack")
    if fp["jetpack_raw"]:
        fp["jetpack"], fp["jetpack_source"] = deb_upstream_version(fp["jetpack_raw"]), "dpkg"
    elif fp["l4t"]:
        fp["jetpack"] = jetpack_for_l4t(fp["l4t"])
        fp["jetpack_source"] = "l4t" if fp["jetpack"] else None

    # GPU rows: full query, else the retry without compute_cap.
    rows = parse_nvidia_smi(s.get("nvidia_smi", ""))
    if not rows:
        rows = parse_nvidia_smi(s.get("nvidia_smi_nocc", ""), SMI_FIELDS_NO_CC)
    if rows:
        gpu = rows[0]
        fp["gpu_name"], fp["driver_version"] = gpu.name, gpu.driver_version
        fp["gpu_memory_mib"], fp["gpu_pci_device_id"] = gpu.memory_mib, gpu.pci_device_id
        fp["gpu_count"] = str(len(rows))

    is_jetson = bool(tegra or core or fp["soc"] or "jetson" in (fp["board_model"] or "").lower())
    fp["kind"] = "jetson" if is_jetson else ("gpu" if rows else "cpu")

    # CUDA
    cuda_json, cuda_stamped = parse_cuda_version_json(s.get("cuda_version_json", ""))
    cuda_sources = [
        ("version.json", cuda_json),
        ("nvcc", parse_nvcc_version(s.get("nvcc", ""))),
        ("version.txt", parse_cuda_version_txt(s.get("cuda_version_txt", ""))),
        ("dpkg", _dpkg_cuda(pkgs)),
        ("version.json:cuda", _truncate(cuda_stamped, 2)),
    ]
    fp["cuda"], _ = _pick("cuda", cuda_sources, 2, conflicts)
    fp["cuda_full"] = _first(v for _, v in cuda_sources)

    # TensorRT
    banner, _build = parse_trtexec_banner(s.get("trtexec_banner", ""))
    fp["tensorrt"], fp["tensorrt_build"] = _pick("tensorrt", [
        ("dpkg", _dpkg_tensorrt(pkgs)),
        ("header", parse_nvinfer_version_header(s.get("nvinfer_header", ""))),
        ("python", parse_python_tensorrt_version(s.get("python_tensorrt", ""))),
        ("trtexec", banner),
        ("dpkg-meta", deb_upstream_version(pkgs.get("tensorrt"))),
    ], 3, conflicts)

    fp["cudnn"], _ = _pick("cudnn", [("header", parse_cudnn_header(s.get("cudnn_header", ""))),
                                     ("dpkg", _dpkg_cudnn(pkgs))], 3, conflicts)

    # Compute capability
    if rows and rows[0].compute_cap:
        fp["compute_capability"], fp["compute_capability_source"] = rows[0].compute_cap, "nvidia-smi"
    elif is_jetson:
        cc = jetson_compute_capability(fp["board_model"], fp["module_name"], fp["soc"], fp["cuda"])
        if cc is None and fp["gpu_name"]:
            cc = jetson_compute_capability(fp["gpu_name"], None, None, fp["cuda"])
        fp["compute_capability"], fp["compute_capability_source"] = cc, "jetson-table" if cc else None
    elif fp["gpu_name"]:
        cc = gpu_compute_capability(fp["gpu_name"])
        fp["compute_capability"], fp["compute_capability_source"] = cc, "gpu-table" if cc else None

    fp["power_mode"], fp["power_mode_id"] = parse_nvpmodel(s.get("nvpmodel", ""))
    fp["onnxruntime"] = _clean(s.get("onnxruntime"))
    fp["python"] = _clean(s.get("python"))
    fp["version_conflicts"] = "; ".join(conflicts) or None
    return fp


def _first(values: Iterable[str | None]) -> str | None:
    return next((v for v in values if v), None)


# --------------------------------------------------------------------------- classes and drift

TENSORRT_CLASS_KEYS = ("kind", "device", "compute_capability", "tensorrt", "cuda", "cudnn", "l4t")


def tensorrt_class_fields(fp: Mapping[str, str | None], *, strict: bool = False) -> dict[str, str | None]:
    """The fingerprint subset a TensorRT engine is married to (facts §7).

    `device` is the Jetson module id (else the device-tree model) or the discrete
    GPU name: same compute capability on another model only warns but is "not
    recommended". TensorRT is compared at major.minor.patch (the precision every
    source gives). Driver, power mode and JetPack are left out (JetPack is implied
    by L4T + the library versions). With strict=True, missing essentials raise ProbeError.
    """
    if fp.get("kind") == "jetson":
        device = fp.get("module") or fp.get("board_model") or fp.get("gpu_name")
    else:
        device = fp.get("gpu_name")
    fields = {"kind": fp.get("kind"), "device": device,
              "compute_capability": fp.get("compute_capability"), "tensorrt": fp.get("tensorrt"),
              "cuda": fp.get("cuda"), "cudnn": fp.get("cudnn"),
              "l4t": fp.get("l4t") if fp.get("kind") == "jetson" else None}
    if strict:
        needed = ["device", "compute_capability", "tensorrt"] + (["l4t"] if fields["kind"] == "jetson" else [])
        missing = [k for k in needed if not fields[k]]
        if fields["kind"] not in ("jetson", "gpu"):
            missing.insert(0, "kind (no NVIDIA GPU found)")
        if missing:
            raise ProbeError("fingerprint lacks what a TensorRT hardware class needs: " + ", ".join(missing),
                             hint="install trtexec/libnvinfer on the target or pick the onnxruntime backend; "
                                  "re-run `doit fingerprint` afterwards")
    return fields


_LABELS = {
    "kind": "device kind", "arch": "architecture", "cpu_model": "CPU", "board_model": "board",
    "module": "module", "module_name": "module name", "soc": "SoC", "l4t": "L4T",
    "l4t_raw": "L4T release line", "l4t_board": "L4T board", "jetpack": "JetPack", "gpu_name": "GPU",
    "gpu_count": "GPU count", "gpu_memory_mib": "GPU memory MiB", "gpu_pci_device_id": "GPU PCI id",
    "driver_version": "driver", "compute_capability": "compute capability", "tensorrt": "TensorRT",
    "tensorrt_build": "TensorRT build", "cuda": "CUDA", "cuda_full": "CUDA (full)", "cudnn": "cuDNN",
    "power_mode": "power mode", "power_mode_id": "power mode id", "onnxruntime": "ONNX Runtime",
    "python": "Python", "device": "device",
}
_QUIET = {"jetpack_source", "jetpack_raw", "compute_capability_source", "version_conflicts"}


def describe_drift(old_fp: Mapping[str, str | None], new_fp: Mapping[str, str | None]) -> list[str]:
    """Human lines for what changed, class-relevant keys first: "TensorRT 8.5.2 → 10.3.0"."""
    order = list(FINGERPRINT_KEYS) + sorted(set(old_fp) | set(new_fp))
    first = ["kind", "module", "board_model", "gpu_name", "compute_capability", "tensorrt", "cuda",
             "cudnn", "l4t"]
    lines, seen = [], set()
    for key in first + order:
        if key in seen or key in _QUIET:
            continue
        seen.add(key)
        a, b = old_fp.get(key), new_fp.get(key)
        if a == b:
            continue
        label = _LABELS.get(key, key)
        if key == "cpu_flags":
            before, after = set((a or "").split()), set((b or "").split())
            parts = [f"+{f}" for f in sorted(after - before)] + [f"-{f}" for f in sorted(before - after)]
            lines.append("CPU flags " + " ".join(parts))
        else:
            lines.append(f"{label} {a if a is not None else 'unknown'} → {b if b is not None else 'unknown'}")
    return lines
