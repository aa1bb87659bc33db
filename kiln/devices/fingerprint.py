"""Fingerprints: what a target says about itself.

Two probes, one shape where they overlap:

- `probe_local()` reads this machine in-process (/proc/cpuinfo, package metadata;
  no subprocess, no import of onnxruntime), so probing it on every run is cheap
  enough to be the up-to-date check itself;
- `probe_remote(transport)` runs kiln.devices.probe_script.PROBE_SCRIPT on the
  target (nothing needed there beyond sh) and `parse_probe_output` turns what it
  printed into a flat fingerprint.

Both read /proc/cpuinfo with the one parser (kiln.devices.cpuinfo), so the same
machine probed either way has the same ONNX Runtime hardware class.

Fingerprint keys (`parse_probe_output`); every value is a string or None (unknown),
except cpu_flags, a list:

=====================  ==========================================================
kind                   "jetson" | "gpu" | "cpu"
arch                   `uname -m` (aarch64, x86_64)
cpu_model              /proc/cpuinfo "model name" of CPU 0 (ARM fallback: implementer/part)
cpu_flags              ISA-relevant CPU flags of CPU 0: sorted list of strings ([] if unknown)
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
onnxruntime            onnxruntime.__version__ of the device's python3, read from its files
onnxruntime_source     "python-file" | "dist-info" | "import" (imported only when no file says)
python                 device python3 version ("3.10.12")
version_conflicts      "tensorrt: dpkg=8.5.2 python=8.6.1; ..." when sources disagree, else None
l4t_source             source of `l4t`: "nv_tegra_release" | "dpkg"
tensorrt_source        source of `tensorrt`: "dpkg" | "header" | "python" (import) |
                       "python-file" | "python-dist" | "trtexec" | "dpkg-meta"
cuda_source            source of `cuda`: "version.json" | "nvcc" | "version.txt" | "dpkg" |
                       "version.json:cuda"
cudnn_source           source of `cudnn`: "header" | "dpkg"
probe_fallback         None when the cheap sources settled TensorRT; else why the probe
                       imported tensorrt / ran trtexec (docs/devices.md §8)
=====================  ==========================================================

Version precedence when sources disagree (the first present wins; the losers are
reported in `version_conflicts`, compared at the precision of the key):
  l4t:       /etc/nv_tegra_release > nvidia-l4t-core deb
  tensorrt:  libnvinfer deb (the installed runtime library) > NvInferVersion.h >
             python tensorrt.__version__ (imported, old probes) > the python package's
             __version__ literal > its dist-info > trtexec banner > "tensorrt" meta deb;
             after a fallback (probe_fallback set) the expensive sources decide:
             python import > trtexec banner > then the order above
  cuda:      version.json cuda_cudart > version.json cuda_nvcc > nvcc --version >
             version.txt > cuda-toolkit-X-Y deb > version.json "cuda" (date-stamped patch dropped)
  cudnn:     cudnn_version header > libcudnn deb
  jetpack:   nvidia-jetpack deb > L4T mapping (they upgrade separately, docs/devices.md §1)
  compute capability: nvidia-smi > Jetson SoC table > discrete GPU name table

Sources, formats and why each precedence is what it is: docs/devices.md.
"""
from __future__ import annotations

from typing import Iterable

from kiln.devices.cpuinfo import parse_cpuinfo
from kiln.devices.nvidia import (
    SMI_FIELDS_NO_CC, clean_value, deb_upstream_version, dpkg_cuda, dpkg_cudnn, dpkg_tensorrt,
    gpu_compute_capability, jetpack_for_l4t, jetson_compute_capability, module_from_compatible,
    parse_cuda_version_json, parse_cuda_version_txt, parse_cudnn_header, parse_device_tree_compatible,
    parse_device_tree_model, parse_dpkg_versions, parse_nv_tegra_release, parse_nvcc_version,
    parse_nvidia_smi, parse_nvinfer_version_header, parse_nvpmodel, parse_python_tensorrt_version,
    parse_trtexec_banner, soc_from_compatible, truncate_version,
)
from kiln.devices.probe_script import fallback_argv, probe_argv, split_sections
from kiln.errors import ProbeError

__all__ = ["FINGERPRINT_KEYS", "parse_probe_output", "probe_remote", "fallback_reason"]

FINGERPRINT_KEYS = (
    "kind", "arch", "cpu_model", "cpu_flags", "board_model", "module", "module_name", "soc",
    "l4t", "l4t_raw", "l4t_board", "jetpack", "jetpack_source", "jetpack_raw", "gpu_name",
    "gpu_count", "gpu_memory_mib", "gpu_pci_device_id", "driver_version", "compute_capability",
    "compute_capability_source", "tensorrt", "tensorrt_build", "cuda", "cuda_full", "cudnn",
    "power_mode", "power_mode_id", "onnxruntime", "python", "version_conflicts",
    "onnxruntime_source", "l4t_source", "tensorrt_source", "cuda_source", "cudnn_source", "probe_fallback",
)
#: what probe_local() reports (it looks at the CPU and ONNX Runtime only)
def _pick(label: str, candidates: Iterable[tuple[str, str | None]], parts: int | None,
          conflicts: list[str], sources: dict | None = None) -> tuple[str | None, str | None]:
    """First present candidate wins; returns (winner, longest agreeing form) and records the
    winner's source in `sources[label]`."""
    present = [(src, v) for src, v in candidates if v]
    if not present:
        return None, None
    winner = present[0][1]
    if sources is not None:
        sources[label] = present[0][0]
    cut = (lambda v: truncate_version(v, parts)) if parts else (lambda v: v)
    agreeing = [v for _, v in present if cut(v) == cut(winner)]
    if len({cut(v) for _, v in present}) > 1:
        conflicts.append(f"{label}: " + " ".join(f"{s}={cut(v)}" for s, v in present))
    return cut(winner), max(agreeing, key=lambda v: len(v.split(".")))


def parse_probe_output(text: str) -> dict[str, object]:
    """PROBE_SCRIPT stdout -> flat fingerprint (keys: FINGERPRINT_KEYS, see the module doc).

    Raises ProbeError when the text holds no probe markers at all.
    """
    s = split_sections(text)
    if "probe" not in s and "uname_m" not in s:
        raise ProbeError("probe output has no @@kiln markers; the probe script did not run",
                         hint="run the probe with `sh -c PROBE_SCRIPT` on the target and check that sh exists",
                         output_head=text[:200] or "<empty>")
    fp: dict[str, object] = dict.fromkeys(FINGERPRINT_KEYS)
    conflicts: list[str] = []
    sources: dict[str, str] = {}
    fp["arch"] = clean_value(s.get("uname_m"))
    fp.update(parse_cpuinfo(s.get("cpuinfo", "")))     # the one cpuinfo parser, as probe_local

    pkgs = parse_dpkg_versions(s.get("dpkg", ""))
    tegra = parse_nv_tegra_release(s.get("nv_tegra_release", ""))
    fp["board_model"] = parse_device_tree_model(s.get("dt_model", ""))
    compatible = parse_device_tree_compatible(s.get("dt_compatible", ""))
    fp["module"], fp["module_name"] = module_from_compatible(compatible)
    fp["soc"] = soc_from_compatible(compatible)

    core = pkgs.get("nvidia-l4t-core")
    fp["l4t"], _ = _pick("l4t", [("nv_tegra_release", tegra.l4t if tegra else None),
                                 ("dpkg", deb_upstream_version(core))], None, conflicts, sources)
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
        ("dpkg", dpkg_cuda(pkgs)),
        ("version.json:cuda", truncate_version(cuda_stamped, 2)),
    ]
    fp["cuda"], _ = _pick("cuda", cuda_sources, 2, conflicts, sources)
    fp["cuda_full"] = _first(v for _, v in cuda_sources)

    # TensorRT: the cheap sources first, unless the probe had to ask the expensive ones
    banner, _build = parse_trtexec_banner(s.get("trtexec_banner", ""))
    expensive = [("python", parse_python_tensorrt_version(s.get("python_tensorrt", ""))), ("trtexec", banner)]
    cheap = _cheap_tensorrt_sources(s, pkgs)
    meta = [("dpkg-meta", deb_upstream_version(pkgs.get("tensorrt")))]
    order = (expensive + cheap if "fallback" in s
             else cheap[:2] + expensive[:1] + cheap[2:] + expensive[1:]) + meta
    fp["tensorrt"], fp["tensorrt_build"] = _pick("tensorrt", order, 3, conflicts, sources)
    fp["probe_fallback"] = clean_value(s.get("fallback"))

    fp["cudnn"], _ = _pick("cudnn", [("header", parse_cudnn_header(s.get("cudnn_header", ""))),
                                     ("dpkg", dpkg_cudnn(pkgs))], 3, conflicts, sources)

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
    fp["onnxruntime"] = clean_value(s.get("onnxruntime"))
    fp["onnxruntime_source"] = (clean_value(s.get("onnxruntime_source")) or "import") if fp["onnxruntime"] else None
    fp["python"] = clean_value(s.get("python"))
    fp["version_conflicts"] = "; ".join(conflicts) or None
    for key in ("l4t", "tensorrt", "cuda", "cudnn"):
        fp[f"{key}_source"] = sources.get(key) if fp[key] else None
    return fp


def _cheap_tensorrt_sources(s: dict[str, str], pkgs: dict[str, str]) -> list[tuple[str, str | None]]:
    """TensorRT versions read from files: the libnvinfer deb, NvInferVersion.h, the python package."""
    return [("dpkg", dpkg_tensorrt(pkgs)),
            ("header", parse_nvinfer_version_header(s.get("nvinfer_header", ""))),
            ("python-file", parse_python_tensorrt_version(s.get("python_tensorrt_file", ""))),
            ("python-dist", parse_python_tensorrt_version(s.get("python_tensorrt_dist", "")))]


def fallback_reason(text: str) -> str | None:
    """Why the cheap probe output `text` cannot settle TensorRT, or None when it can.

    It can when at least two cheap sources (libnvinfer deb, NvInferVersion.h, the python
    package's files) name a version and all agree at major.minor.patch, or when nothing on
    the device could say more (no trtexec, no tensorrt python package: then TensorRT is
    absent or the cheap answer is all there is). Otherwise the probe asks the expensive
    sources (FALLBACK_SCRIPT), which load libnvinfer and CUDA.
    """
    s = split_sections(text)
    if "trtexec_path" not in s and "python_tensorrt_spec" not in s:
        return None
    present = [(src, v) for src, v in _cheap_tensorrt_sources(s, parse_dpkg_versions(s.get("dpkg", ""))) if v]
    if not present:
        return ("no cheap TensorRT source (no libnvinfer deb, no NvInferVersion.h, no version in the "
                "python tensorrt package's files)")
    if len({truncate_version(v, 3) for _, v in present}) > 1:
        return "cheap TensorRT sources disagree: " + " ".join(f"{src}={truncate_version(v, 3)}" for src, v in present)
    if len(present) == 1:
        src, v = present[0]
        return f"only {src} says TensorRT {truncate_version(v, 3)}; no second cheap source confirms it"
    return None


def _first(values: Iterable[str | None]) -> str | None:
    return next((v for v in values if v), None)


# --------------------------------------------------------------------------- probes

def probe_remote(transport, trtexec: str | None = None, python: str = "python3", *,
                 backend: str | None = None, force_fallback: str | None = None) -> dict[str, object]:
    """Run the shell probe on a device (nothing needed there beyond sh) and parse it.

    One remote command that reads files (PROBE_SCRIPT). A second one (FALLBACK_SCRIPT:
    import tensorrt, else trtexec --help) only for a target that may need TensorRT
    (`backend` None or "tensorrt") whose cheap TensorRT sources are missing or disagree
    (`fallback_reason`), or when `force_fallback` (a reason) asks for it.
    """
    from kiln.errors import KilnError
    try:
        text = transport.run(probe_argv(trtexec=trtexec, python=python), timeout=60).stdout
        reason = force_fallback or (fallback_reason(text) if backend in (None, "tensorrt") else None)
        if reason:
            text += "\n" + transport.run(fallback_argv(reason, trtexec=trtexec, python=python), timeout=120).stdout
    except KilnError as exc:
        raise ProbeError(f"cannot probe {transport.target}: {exc.message}", target=transport.target,
                         hint=exc.hint or "check that the device is up and reachable") from exc
    return parse_probe_output(text)
