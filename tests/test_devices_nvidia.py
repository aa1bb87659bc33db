"""Parsers and probe for NVIDIA device facts.

Samples are device output quoted verbatim in docs/devices.md (with the source of
each); where a sample had to be assembled (e.g. a whole probe output), each piece
is still a verbatim line from there.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.devices import fingerprint as fpm
from kiln.devices import hwclass
from kiln.devices import nvidia as nv
from kiln.devices import probe_script as ps
from kiln.errors import ProbeError

REPO = Path(__file__).resolve().parents[1]
SIM = REPO / "tests" / "fleet" / "trtexec_sim.py"

# ---------------------------------------------------------------- verbatim samples (docs/devices.md §1-§3)
TEGRA_R32 = "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, DATE: Sat Feb 19 17:05:08 UTC 2022\n"
TEGRA_R35 = "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023\n"
TEGRA_R36 = ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13 04:36:44 UTC 2024\n"
             "# KERNEL_VARIANT: oot\n"
             "TARGET_USERSPACE_LIB_DIR=nvidia\n")
NVPMODEL = "NV Power Mode: MAXN\n0\n"
VERSION_JSON = ('{"cuda": {"name": "CUDA SDK", "version": "12.6.20241114"}, '
                '"cuda_nvcc": {"name": "CUDA NVCC", "version": "12.6.85"}}')
NVCC = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2024 NVIDIA Corporation
Built on Wed_Aug_14_10:10:22_PDT_2024
Cuda compilation tools, release 12.6, V12.6.68
Build cuda_12.6.r12.6/compiler.34714021_0
"""
SMI_T4_FACTS = "Tesla T4, 7.5, 15360 MiB, 615.71.09"          # fields: name, compute_cap, memory.total, driver_version
SMI_HEADER_FACTS = "name, compute_cap, memory.total [MiB], driver_version"
SMI_BAD_FIELD = 'Field "compute_cap" is not a valid field to query.'
NVINFER_10_14 = """#define TRT_MAJOR_ENTERPRISE 10
#define TRT_MINOR_ENTERPRISE 14
#define TRT_PATCH_ENTERPRISE 1
#define TRT_BUILD_ENTERPRISE 48
#define NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE //!< TensorRT major version.
#define NV_TENSORRT_MINOR TRT_MINOR_ENTERPRISE //!< TensorRT minor version.
#define NV_TENSORRT_PATCH TRT_PATCH_ENTERPRISE //!< TensorRT patch version.
#define NV_TENSORRT_BUILD TRT_BUILD_ENTERPRISE //!< TensorRT build number.
"""
NVINFER_8_5 = """#define NV_TENSORRT_MAJOR 8 //!< TensorRT major version.
#define NV_TENSORRT_MINOR 5 //!< TensorRT minor version.
#define NV_TENSORRT_PATCH 2 //!< TensorRT patch version.
#define NV_TENSORRT_BUILD 2 //!< TensorRT build number.
#define NV_TENSORRT_SONAME_MAJOR 8 //!< Shared object library major version number.
"""
CUDNN_V8 = "#define CUDNN_MAJOR 8\n#define CUDNN_MINOR 6\n#define CUDNN_PATCHLEVEL 0\n#define CUDNN_VERSION (CUDNN_MAJOR * 1000 + CUDNN_MINOR * 100 + CUDNN_PATCHLEVEL)\n"
CUDNN_V9 = "#define CUDNN_MAJOR 9\n#define CUDNN_MINOR 3\n#define CUDNN_PATCHLEVEL 0\n#define CUDNN_VERSION (CUDNN_MAJOR * 10000 + CUDNN_MINOR * 100 + CUDNN_PATCHLEVEL)\n"
ORIN_NANO_COMPATIBLE = "nvidia,p3768-0000+p3767-0005\x00nvidia,p3767-0005\x00nvidia,tegra234\x00"
AARCH64_CPUINFO = """processor\t: 0
BogoMIPS\t: 62.50
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp uscat ilrcpc flagm paca pacg
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd42
CPU revision\t: 1
"""


def probe_text(**sections: str) -> str:
    out = ["@@kiln:probe@@", "1", "@@kiln:end@@"]
    for name, body in sections.items():
        out += [f"@@kiln:{name}@@", body.rstrip("\n"), "", "@@kiln:end@@"]
    return "\n".join(out) + "\n"


JP4_NANO = probe_text(
    uname_m="aarch64", nv_tegra_release=TEGRA_R32,
    dt_model="NVIDIA Jetson Nano Developer Kit\n",
    dt_compatible="nvidia,p3450-0000\nnvidia,jetson-nano\nnvidia,tegra210\n",
    dpkg="ii |nvidia-l4t-core 32.7.1-20220219090432\nii |nvidia-jetpack 4.6-b199\nii |cuda-toolkit-10-2 10.2.460-1\n",
    cuda_version_txt="CUDA Version 10.2.300\n",
    trtexec_banner="&&&& RUNNING TensorRT.trtexec [TensorRT v8201] # /usr/src/tensorrt/bin/trtexec --help\n",
)

JP5_ORIN_NANO = probe_text(
    uname_m="aarch64", cpuinfo=AARCH64_CPUINFO, nv_tegra_release=TEGRA_R35,
    dt_model="NVIDIA Jetson Orin Nano Developer Kit\n", dt_compatible=ORIN_NANO_COMPATIBLE.replace("\x00", "\n"),
    dpkg=("ii |nvidia-l4t-core 35.4.1-20230801124926\nii |nvidia-jetpack 5.1.2-b104\n"
          "ii |libnvinfer8 8.5.2-1+cuda11.4\nii |libcudnn8 8.6.0.166-1+cuda11.4\nii |cuda-toolkit-11-4 11.4.19-1\n"),
    cudnn_header=CUDNN_V8, nvinfer_header=NVINFER_8_5,
    trtexec_banner="&&&& RUNNING TensorRT.trtexec [TensorRT v8502] # trtexec --help\n",
    nvpmodel=NVPMODEL, python="3.8.10", python_tensorrt="8.5.2.2",
)

JP6_AGX_ORIN = probe_text(
    uname_m="aarch64", nv_tegra_release=TEGRA_R36,
    dt_model="NVIDIA Jetson AGX Orin Developer Kit\n",
    dt_compatible="nvidia,p3737-0000+p3701-0005\nnvidia,p3701-0005\nnvidia,tegra234\n",
    dpkg=("ii |nvidia-jetpack 6.2.1+b38\nii |libnvinfer10 10.3.0.30-1+cuda12.5\nii |tensorrt 10.3.0.30-1+cuda12.5\n"
          "ii |python3-libnvinfer 10.3.0.30-1+cuda12.5\nii |libcudnn9-cuda-12 9.3.0.75-1\n"),
    cuda_version_json=VERSION_JSON, nvcc=NVCC, cudnn_header=CUDNN_V9,
    nvidia_smi="Orin (nvgpu), 8.7, 540.4.0, [N/A], [N/A]\n",
    trtexec_banner="&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --help\n",
    nvpmodel=NVPMODEL, python_tensorrt="10.3.0",
)

T4_GPU = probe_text(
    uname_m="x86_64", nvidia_smi="Tesla T4, 7.5, 615.71.09, 15360 MiB, 0x1EB810DE\n",
    dpkg="ii |libnvinfer10 10.9.0.34-1+cuda12.8\n", python_tensorrt="10.9.0.34",
    cuda_version_json=VERSION_JSON,
)

T4_OLD_DRIVER = probe_text(
    uname_m="x86_64", nvidia_smi_nocc="Tesla T4, 470.82.01, 15109 MiB, 0x1EB810DE\n",
    nvidia_smi_error="rc=2\n" + SMI_BAD_FIELD + "\n",
    trtexec_banner="&&&& RUNNING TensorRT.trtexec [TensorRT v8502] # trtexec --help\n",
)


# ---------------------------------------------------------------- single sources

@pytest.mark.parametrize("text,l4t,board,gcid", [
    (TEGRA_R32, "32.7.1", "t210ref", "29818004"),
    (TEGRA_R35, "35.4.1", "t186ref", "33958178"),
    (TEGRA_R36, "36.4.0", "generic", "37537400"),
])
def test_nv_tegra_release(text, l4t, board, gcid):
    rel = nv.parse_nv_tegra_release(text)
    assert (rel.l4t, rel.board, rel.gcid) == (l4t, board, gcid)
    assert rel.raw == text.splitlines()[0]


def test_nv_tegra_release_garbage_is_none():
    assert nv.parse_nv_tegra_release("") is None
    assert nv.parse_nv_tegra_release("hello\n") is None


def test_device_tree_nul_terminated():
    assert nv.parse_device_tree_model("NVIDIA Jetson AGX Orin Developer Kit\x00") == "NVIDIA Jetson AGX Orin Developer Kit"
    assert nv.parse_device_tree_model("") is None
    entries = nv.parse_device_tree_compatible(ORIN_NANO_COMPATIBLE)
    assert entries == ["nvidia,p3768-0000+p3767-0005", "nvidia,p3767-0005", "nvidia,tegra234"]
    assert nv.module_from_compatible(entries) == ("p3767-0005", "Jetson Orin Nano Developer Kit")
    assert nv.soc_from_compatible(entries) == "tegra234"


@pytest.mark.parametrize("compatible,expected", [
    (["nvidia,p3768-0000+p3767-0000", "nvidia,p3767-0000", "nvidia,tegra234"], ("p3767-0000", "Jetson Orin NX 16GB")),
    (["nvidia,p3768-0000+p3767-0004-super"], ("p3767-0004-super", "Jetson Orin Nano 4GB Super")),
    (["nvidia,p2972-0000", "nvidia,tegra194"], ("p2972-0000", "Jetson AGX Xavier")),
    (["nvidia,p3509-0000+p3668-0001", "nvidia,tegra194"], ("p3668-0001", "Jetson Xavier NX")),
    (["nvidia,p9999-0000", "nvidia,tegra234"], ("p9999-0000", None)),
    (["nvidia,tegra234"], (None, None)),
])
def test_module_ids(compatible, expected):
    assert nv.module_from_compatible(compatible) == expected


def test_dpkg_versions_and_status_filter():
    text = ("nvidia-l4t-core 36.4.7-20250918154033\nnvidia-jetpack 6.2.1+b38\n"
            "libnvinfer10 10.3.0.30-1+cuda12.5\n")
    pkgs = nv.parse_dpkg_versions(text)
    assert pkgs["nvidia-l4t-core"] == "36.4.7-20250918154033"
    assert nv.deb_upstream_version(pkgs["nvidia-l4t-core"]) == "36.4.7"
    assert nv.deb_upstream_version("5.1.2-b104") == "5.1.2"
    assert nv.deb_upstream_version("6.2.1+b38") == "6.2.1"
    assert nv.deb_upstream_version("4.6-b199") == "4.6"
    assert nv.deb_upstream_version("8.5.2-1+cuda11.4") == "8.5.2"
    # removed package with config left ("rc") does not count
    pkgs = nv.parse_dpkg_versions("rc |libnvinfer8 8.6.2.3-1+cuda12.2\nii |libnvinfer10 10.3.0.30-1+cuda12.5\n"
                                  "un |nvidia-jetpack \n")
    assert pkgs == {"libnvinfer10": "10.3.0.30-1+cuda12.5"}


def test_cuda_sources():
    assert nv.parse_cuda_version_json(VERSION_JSON) == ("12.6.85", "12.6.20241114")
    both = '{"cuda": {"version": "12.6.20241114"}, "cuda_cudart": {"version": "12.6.77"}, "cuda_nvcc": {"version": "12.6.85"}}'
    assert nv.parse_cuda_version_json(both)[0] == "12.6.77"
    assert nv.parse_cuda_version_json("not json") == (None, None)
    assert nv.parse_cuda_version_txt("CUDA Version 10.2.300") == "10.2.300"
    assert nv.parse_nvcc_version(NVCC) == "12.6.68"


def test_headers():
    assert nv.parse_cudnn_header(CUDNN_V8) == "8.6.0"
    assert nv.parse_cudnn_header(CUDNN_V9) == "9.3.0"
    assert nv.parse_nvinfer_version_header(NVINFER_8_5) == "8.5.2.2"
    assert nv.parse_nvinfer_version_header(NVINFER_10_14) == "10.14.1.48"
    assert nv.parse_nvinfer_version_header("#define NV_TENSORRT_MAJOR FOO\n") is None


@pytest.mark.parametrize("line,version,build", [
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v8502] # trtexec --onnx=./yolox_s_leaky.onnx", "8.5.2", None),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec", "10.3.0", None),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v100800] [b43] # trtexec", "10.8.0", "43"),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v100600] [b26] # trtexec --help", "10.6.0", "26"),
    ("[02/26/2024-10:43:06] [I] TensorRT version: 8.5.2", "8.5.2", None),
    ("nothing here", None, None),
])
def test_trtexec_banner(line, version, build):
    assert nv.parse_trtexec_banner(line) == (version, build)


def test_python_and_nvpmodel():
    assert nv.parse_python_tensorrt_version("8.5.2.2\n") == "8.5.2.2"
    assert nv.parse_python_tensorrt_version("10.3.0") == "10.3.0"
    assert nv.parse_nvpmodel(NVPMODEL) == ("MAXN", "0")
    verbose = "NVPM VERB: Config file: /etc/nvpmodel.conf\nNV Power Mode: MAXN_SUPER\n2\n"
    assert nv.parse_nvpmodel(verbose) == ("MAXN_SUPER", "2")
    assert nv.parse_nvpmodel("") == (None, None)


def test_nvidia_smi_rows():
    rows = nv.parse_nvidia_smi(SMI_HEADER_FACTS + "\n" + SMI_T4_FACTS,
                               ("name", "compute_cap", "memory.total", "driver_version"))
    assert len(rows) == 1
    assert (rows[0].name, rows[0].compute_cap, rows[0].memory_mib, rows[0].driver_version) == \
        ("Tesla T4", "7.5", "15360", "615.71.09")
    assert nv.parse_nvidia_smi(SMI_BAD_FIELD) == []
    jetson = nv.parse_nvidia_smi("Orin (nvgpu), 8.7, 540.4.0, Not Supported, [N/A]")
    assert jetson[0].memory_mib is None and jetson[0].pci_device_id is None


@pytest.mark.parametrize("l4t,jp", [
    ("32.7.1", "ambiguous"), ("32.7.4", "4.6.4"), ("35.1.0", "5.0.2"), ("35.3.0", "5.1.1 PRE"),
    ("35.4.1", "5.1.2"), ("35.6.2", "ambiguous"), ("35.6.4", "5.1.6"), ("36.2.0", "6.0 DP"),
    ("36.3.0", "6.0"), ("36.4.0", "6.1"), ("36.4.2", "ambiguous"), ("36.4.3", "6.2"),
    ("36.4.7", "6.2.1"), ("99.1.0", None), (None, None),
])
def test_jetpack_mapping(l4t, jp):
    assert nv.jetpack_for_l4t(l4t) == jp


def test_jetson_compute_capability():
    assert nv.jetson_compute_capability("NVIDIA Jetson AGX Orin Developer Kit") == "8.7"
    assert nv.jetson_compute_capability("NVIDIA Jetson Xavier NX Developer Kit (SD-card)") == "7.2"
    assert nv.jetson_compute_capability("NVIDIA Jetson Nano Developer Kit") == "5.3"
    assert nv.jetson_compute_capability(None, soc="tegra186") == "6.2"
    # Orin Nano's model string must not read as the old Nano
    assert nv.jetson_compute_capability("NVIDIA Jetson Orin Nano Developer Kit") == "8.7"
    assert nv.jetson_compute_capability("NVIDIA Jetson AGX Thor Developer Kit", cuda="12.8") == "10.1"
    assert nv.jetson_compute_capability("NVIDIA Jetson AGX Thor Developer Kit", cuda="13.0") == "11.0"
    assert nv.jetson_compute_capability("NVIDIA Jetson AGX Thor Developer Kit") is None


# ---------------------------------------------------------------- whole fingerprints

def test_jp4_nano():
    fp = fpm.parse_probe_output(JP4_NANO)
    assert set(fp) == set(fpm.FINGERPRINT_KEYS)
    assert fp["kind"] == "jetson" and fp["l4t"] == "32.7.1" and fp["l4t_board"] == "t210ref"
    assert fp["module"] == "p3450-0000" and fp["compute_capability"] == "5.3"
    assert fp["compute_capability_source"] == "jetson-table"
    assert (fp["jetpack"], fp["jetpack_source"], fp["jetpack_raw"]) == ("4.6", "dpkg", "4.6-b199")
    assert (fp["cuda"], fp["cuda_full"]) == ("10.2", "10.2.300")
    assert fp["tensorrt"] == "8.2.1" and fp["cudnn"] is None


def test_jp5_orin_nano():
    fp = fpm.parse_probe_output(JP5_ORIN_NANO)
    assert fp["kind"] == "jetson" and fp["arch"] == "aarch64"
    assert fp["board_model"] == "NVIDIA Jetson Orin Nano Developer Kit"
    assert fp["module"] == "p3767-0005" and fp["soc"] == "tegra234"
    assert fp["l4t"] == "35.4.1" and fp["l4t_raw"] == TEGRA_R35.strip()
    assert fp["jetpack"] == "5.1.2"
    assert fp["tensorrt"] == "8.5.2" and fp["tensorrt_build"] == "8.5.2.2"
    assert fp["cuda"] == "11.4" and fp["cudnn"] == "8.6.0" and fp["compute_capability"] == "8.7"
    assert fp["power_mode"] == "MAXN" and fp["power_mode_id"] == "0"
    assert fp["cpu_flags"] == ["aes", "asimd", "asimddp", "asimdhp", "asimdrdm", "atomics", "fp", "fphp"]
    assert fp["cpu_model"] == "ARM implementer 0x41 part 0xd42"
    assert fp["version_conflicts"] is None and fp["gpu_name"] is None


def test_jp6_agx_orin_prefers_dpkg_jetpack_and_smi():
    fp = fpm.parse_probe_output(JP6_AGX_ORIN)
    assert fp["kind"] == "jetson" and fp["l4t"] == "36.4.0" and fp["l4t_board"] == "generic"
    # nvidia-jetpack 6.2.1 on L4T 36.4.0 (observed): the deb wins over the L4T map (6.1)
    assert (fp["jetpack"], fp["jetpack_source"]) == ("6.2.1", "dpkg")
    assert fp["gpu_name"] == "Orin (nvgpu)" and fp["driver_version"] == "540.4.0"
    assert fp["compute_capability"] == "8.7" and fp["compute_capability_source"] == "nvidia-smi"
    assert fp["gpu_memory_mib"] is None
    assert fp["tensorrt"] == "10.3.0" and fp["tensorrt_build"] == "10.3.0.30"
    # version.json's date-stamped "cuda.version" is not used; nvcc JSON entry wins over `nvcc --version`
    assert fp["cuda"] == "12.6" and fp["cuda_full"] == "12.6.85"
    assert fp["cudnn"] == "9.3.0" and fp["module"] == "p3701-0005"


def test_discrete_t4():
    fp = fpm.parse_probe_output(T4_GPU)
    assert fp["kind"] == "gpu" and fp["gpu_name"] == "Tesla T4" and fp["gpu_count"] == "1"
    assert fp["compute_capability"] == "7.5" and fp["gpu_memory_mib"] == "15360"
    assert fp["gpu_pci_device_id"] == "0x1EB810DE" and fp["driver_version"] == "615.71.09"
    assert fp["tensorrt"] == "10.9.0" and fp["tensorrt_build"] == "10.9.0.34"
    assert fp["l4t"] is None and fp["jetpack"] is None


def test_old_driver_without_compute_cap_uses_table():
    fp = fpm.parse_probe_output(T4_OLD_DRIVER)
    assert fp["kind"] == "gpu" and fp["driver_version"] == "470.82.01"
    assert fp["compute_capability"] == "7.5" and fp["compute_capability_source"] == "gpu-table"
    unknown = T4_OLD_DRIVER.replace("Tesla T4", "Quadro Mystery")
    fp = fpm.parse_probe_output(unknown)
    assert fp["compute_capability"] is None and fp["compute_capability_source"] is None


def test_missing_sources_give_none_not_errors():
    fp = fpm.parse_probe_output(probe_text(uname_m="x86_64"))
    assert fp["kind"] == "cpu" and fp["arch"] == "x86_64"
    assert fp["cpu_flags"] == []   # always a list
    assert all(fp[k] is None for k in fpm.FINGERPRINT_KEYS if k not in ("kind", "arch", "cpu_flags"))
    # a Jetson whose nv_tegra_release is gone: L4T from the l4t-core deb, JetPack mapped
    fp = fpm.parse_probe_output(probe_text(dpkg="nvidia-l4t-core 35.4.1-20230801124926\n"))
    assert (fp["kind"], fp["l4t"], fp["jetpack"], fp["jetpack_source"]) == ("jetson", "35.4.1", "5.1.2", "l4t")
    assert fp["l4t_raw"] == "35.4.1-20230801124926"


def test_no_markers_is_a_probe_error():
    with pytest.raises(ProbeError) as err:
        fpm.parse_probe_output("sh: 1: Syntax error\n")
    assert "markers" in str(err.value) and err.value.hint


def test_version_precedence_and_conflicts():
    text = probe_text(
        nv_tegra_release=TEGRA_R36,
        dpkg="nvidia-l4t-core 36.4.7-20250918154033\nlibnvinfer8 8.6.2.3-1+cuda12.2\n",
        python_tensorrt="10.3.0",
        trtexec_banner="&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --help",
        nvcc=NVCC, cuda_version_txt="CUDA Version 10.2.300",
    )
    fp = fpm.parse_probe_output(text)
    assert fp["l4t"] == "36.4.0"            # nv_tegra_release beats nvidia-l4t-core
    assert fp["tensorrt"] == "8.6.2"        # installed libnvinfer deb beats python and trtexec
    assert fp["tensorrt_build"] == "8.6.2.3"
    assert fp["cuda"] == "12.6"             # nvcc beats version.txt
    conflicts = fp["version_conflicts"]
    assert "l4t: nv_tegra_release=36.4.0 dpkg=36.4.7" in conflicts
    assert "tensorrt: dpkg=8.6.2 python=10.3.0 trtexec=10.3.0" in conflicts
    assert "cuda: nvcc=12.6 version.txt=10.2" in conflicts


def test_tensorrt_class_fields_and_drift():
    jp5 = fpm.parse_probe_output(JP5_ORIN_NANO)
    hw = hwclass.hardware_class("tensorrt", jp5)
    assert hw.fields == {"module": "p3767-0005", "board_model": "NVIDIA Jetson Orin Nano Developer Kit",
                         "gpu_name": None, "compute_capability": "8.7", "tensorrt": "8.5.2", "cuda": "11.4",
                         "cudnn": "8.6.0", "l4t": "35.4.1"}
    assert hw.label == "p3767-0005-sm8.7-trt8.5.2"
    # power mode is not class-relevant
    assert hwclass.hardware_class("tensorrt", {**jp5, "power_mode": "15W"}) == hw
    t4 = hwclass.hardware_class("tensorrt", fpm.parse_probe_output(T4_GPU))
    assert t4.fields["gpu_name"] == "Tesla T4" and t4.fields["l4t"] is None

    upgraded = dict(jp5, tensorrt="10.3.0", cuda="12.6", l4t="36.4.0", power_mode=None)
    lines = hwclass.describe_change(jp5, upgraded, "tensorrt")
    assert lines == ["CUDA 11.4 → 12.6", "L4T 35.4.1 → 36.4.0", "TensorRT 8.5.2 → 10.3.0"]
    assert hwclass.hardware_class("tensorrt", upgraded) != hw
    assert hwclass.describe_change(jp5, dict(jp5), "tensorrt") == []
    flags = hwclass.describe_change({"cpu_flags": ["avx", "avx2"]}, {"cpu_flags": ["avx", "avx512f"]},
                                    "onnxruntime")
    assert flags == ["CPU ISA +avx512f -avx2"]


def test_tensorrt_class_names_what_is_missing():
    cpu = fpm.parse_probe_output(probe_text(uname_m="x86_64"))
    with pytest.raises(ProbeError) as err:
        hwclass.hardware_class("tensorrt", cpu, target="box-1")
    assert "no NVIDIA GPU" in str(err.value) and "box-1" in str(err.value)
    assert 'backend = "onnxruntime"' in err.value.hint and "doit fingerprint:box-1" in err.value.hint
    nano = fpm.parse_probe_output(JP4_NANO.replace("[TensorRT v8201]", "[TensorRT vX]"))
    with pytest.raises(ProbeError, match="TensorRT not found"):
        hwclass.hardware_class("tensorrt", nano)
    no_l4t = {**fpm.parse_probe_output(JP4_NANO), "l4t": None}
    with pytest.raises(ProbeError, match="L4T version unknown"):
        hwclass.require_class_fields("tensorrt", no_l4t)
    unknown_cc = fpm.parse_probe_output(T4_OLD_DRIVER.replace("Tesla T4", "Quadro Mystery"))
    with pytest.raises(ProbeError, match="compute capability unknown"):
        hwclass.require_class_fields("tensorrt", unknown_cc, "quadro")


# ---------------------------------------------------------------- the probe script for real

def run_probe(env=None, args=()):
    return subprocess.run(["sh", "-c", ps.PROBE_SCRIPT, "kiln-probe", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_probe_script_on_this_machine_is_a_cpu():
    result = run_probe()
    assert result.returncode == 0, result.stderr
    fp = fpm.parse_probe_output(result.stdout)
    assert fp["kind"] == "cpu"
    assert fp["arch"] == os.uname().machine
    assert fp["python"] and fp["python"].startswith("3.")
    if Path("/proc/cpuinfo").exists():
        assert fp["cpu_model"]
    assert ps.probe_argv()[:3] == ["sh", "-c", ps.PROBE_SCRIPT]


def _exe(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture()
def fake_jetson(tmp_path):
    """A JP6 Orin Nano as files under a root, plus fake device tools on PATH."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/nv_tegra_release").write_text(TEGRA_R36)
    dt = root / "sys/firmware/devicetree/base"   # the /proc/device-tree symlink target
    dt.mkdir(parents=True)
    (dt / "model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    (dt / "compatible").write_bytes(ORIN_NANO_COMPATIBLE.encode())
    (root / "proc").mkdir()
    (root / "proc/cpuinfo").write_text(AARCH64_CPUINFO + "\nprocessor\t: 1\nFeatures\t: fp\n")
    (root / "usr/local/cuda").mkdir(parents=True)
    (root / "usr/local/cuda/version.json").write_text(VERSION_JSON)
    inc = root / "usr/include/aarch64-linux-gnu"
    inc.mkdir(parents=True)
    (inc / "cudnn_version_v9.h").write_text("/* cudnn */\n" + CUDNN_V9)
    (inc / "NvInferVersion.h").write_text("#ifndef NV_INFER_VERSION_H\n" + NVINFER_10_14.replace("14", "3", 1)
                                          .replace("PATCH_ENTERPRISE 1", "PATCH_ENTERPRISE 0")
                                          .replace("BUILD_ENTERPRISE 48", "BUILD_ENTERPRISE 30") + "#endif\n")
    trtexec = root / "usr/src/tensorrt/bin/trtexec"
    trtexec.parent.mkdir(parents=True)
    shutil.copy(SIM, trtexec)
    trtexec.chmod(0o755)
    binp = tmp_path / "bin"
    _exe(binp / "uname", "#!/bin/sh\necho aarch64\n")
    _exe(binp / "dpkg-query", "#!/bin/sh\nprintf 'ii |nvidia-l4t-core 36.4.0-20240912212859\\n"
                              "ii |libnvinfer10 10.3.0.30-1+cuda12.5\\nrc |libnvinfer8 8.6.2.3-1+cuda12.2\\n'\nexit 1\n")
    # old-driver shape: compute_cap is not a valid field (exit 2), the probe must retry without it
    _exe(binp / "nvidia-smi", "#!/bin/sh\ncase \"$*\" in *compute_cap*) "
                              "echo 'Field \"compute_cap\" is not a valid field to query.'; exit 2;; esac\n"
                              "echo 'Orin (nvgpu), 540.4.0, [N/A], [N/A]'\n")
    _exe(binp / "nvpmodel", "#!/bin/sh\nprintf 'NV Power Mode: 15W\\n1\\n'\n")
    env = {"PATH": f"{binp}:/usr/bin:/bin", "KILN_PROBE_ROOT": str(root), "HOME": str(tmp_path),
           "KILN_SIM_TRT_VERSION": "10.3.0.30", "KILN_SIM_COMPUTE": "8.7", "KILN_SIM_GPU": "Orin"}
    if not shutil.which("python3", path=env["PATH"]):
        _exe(binp / "python3", f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    return env


def test_probe_script_in_fake_root(fake_jetson):
    result = run_probe(env=fake_jetson)
    assert result.returncode == 0, result.stderr
    fp = fpm.parse_probe_output(result.stdout)
    assert fp["kind"] == "jetson" and fp["arch"] == "aarch64"
    assert fp["board_model"] == "NVIDIA Jetson Orin Nano Developer Kit" and fp["module"] == "p3767-0005"
    assert fp["l4t"] == "36.4.0" and fp["jetpack"] == "6.1" and fp["jetpack_source"] == "l4t"
    assert fp["tensorrt"] == "10.3.0" and fp["tensorrt_build"] == "10.3.0.30"
    assert fp["cuda"] == "12.6" and fp["cudnn"] == "9.3.0"
    assert fp["gpu_name"] == "Orin (nvgpu)" and fp["compute_capability"] == "8.7"
    assert fp["compute_capability_source"] == "jetson-table"
    assert (fp["power_mode"], fp["power_mode_id"]) == ("15W", "1")
    assert fp["cpu_flags"] == ["aes", "asimd", "asimddp", "asimdhp", "asimdrdm", "atomics", "fp", "fphp"]  # CPU 0 only
    assert fp["version_conflicts"] is None, fp["version_conflicts"]
    sections = ps.split_sections(result.stdout)
    # the cheap probe only looks whether trtexec is there; deb and header agree, so no fallback
    assert "trtexec_banner" not in sections and sections["trtexec_path"].endswith("/usr/src/tensorrt/bin/trtexec")
    assert fpm.fallback_reason(result.stdout) is None and fp["probe_fallback"] is None
    assert fp["tensorrt_source"] == "dpkg" and fp["l4t_source"] == "nv_tegra_release"
    assert 'not a valid field' in sections["nvidia_smi_error"]
    fallback = subprocess.run(["sh", "-c", ps.FALLBACK_SCRIPT, "x", "", "python3", "forced"], capture_output=True,
                              text=True, timeout=120, env=fake_jetson)
    assert ps.split_sections(fallback.stdout)["trtexec_banner"].startswith(
        "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] #")


def test_probe_script_trtexec_argument(fake_jetson, tmp_path):
    other = tmp_path / "opt/trt/trtexec"
    other.parent.mkdir(parents=True)
    shutil.copy(SIM, other)
    other.chmod(0o755)
    env = dict(fake_jetson, KILN_SIM_TRT_VERSION="10.8.0.43")
    cheap = run_probe(env=env, args=(str(other),)).stdout
    assert ps.split_sections(cheap)["trtexec_path"] == str(other)
    fp = fpm.parse_probe_output(cheap)
    assert fp["tensorrt"] == "10.3.0" and fp["version_conflicts"] is None   # trtexec was not run
    fallback = subprocess.run(["sh", "-c", ps.FALLBACK_SCRIPT, *ps.fallback_argv("forced", str(other))[3:]],
                              capture_output=True, text=True, timeout=120, env=env).stdout
    fp = fpm.parse_probe_output(cheap + fallback)
    # after a fallback the expensive source (the banner of the trtexec given) decides;
    # the disagreement is reported, not hidden
    assert fp["tensorrt"] == "10.8.0" and fp["tensorrt_source"] == "trtexec"
    assert fp["probe_fallback"] == "forced"
    assert "header=10.3.0" in fp["version_conflicts"] and "trtexec=10.8.0" in fp["version_conflicts"]


def test_probe_script_prefers_proc_device_tree(fake_jetson):
    root = Path(fake_jetson["KILN_PROBE_ROOT"])
    proc_dt = root / "proc/device-tree"
    proc_dt.mkdir()
    (proc_dt / "model").write_bytes(b"NVIDIA Jetson Orin NX Engineering Reference Developer Kit\x00")
    fp = fpm.parse_probe_output(run_probe(env=fake_jetson).stdout)
    # the model string follows the flashed DTB (Orin Nanos have reported the NX string);
    # the module id comes from compatible (here only under /sys)
    assert fp["board_model"] == "NVIDIA Jetson Orin NX Engineering Reference Developer Kit"
    assert fp["module"] == "p3767-0005" and fp["compute_capability"] == "8.7"
    assert hwclass.hardware_class("tensorrt", fp).fields["module"] == "p3767-0005"
