"""Device facts against real text: whole headers, a real server's probe output, one cpuinfo parser.

tests/samples/dgpu-h200-probe-output.txt is what the probe script printed on a real
x86_64 server with one NVIDIA H200 (driver 580.159.04, CUDA 13.0 toolkit, cuDNN 9.14,
no TensorRT). CUDNN_H200 is that machine's cudnn_version.h minus its 48-line licence
comment; the other headers follow the real files' layout (NVIDIA/TensorRT
include/NvInferVersion.h: licence, `//!` doc comment, guard, blank line, defines with
`//!<` comments) with each JetPack's versions (docs/devices.md §1, §2, §5).
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.devices import hwclass
from kiln.devices.cpuinfo import ISA_FLAGS, parse_cpuinfo
from kiln.devices.fingerprint import parse_probe_output, probe_remote
from kiln.devices.local_probe import package_version, probe_local
from kiln.devices.nvidia import parse_c_defines, parse_cudnn_header, parse_nvinfer_version_header
from kiln.devices.probe_script import CUDNN_HEADERS, PROBE_SCRIPT, split_sections
from kiln.errors import ProbeError
try:
    from kiln.transports.local import LocalTransport
except ImportError:   # before the transports split
    from kiln.transports.base import LocalTransport

REPO = Path(__file__).resolve().parents[1]
SAMPLES = Path(__file__).resolve().parent / "samples"
H200 = (SAMPLES / "dgpu-h200-probe-output.txt").read_text()

CUDNN_H200 = """\
#ifndef CUDNN_VERSION_H_
#define CUDNN_VERSION_H_

#define CUDNN_MAJOR 9
#define CUDNN_MINOR 14
#define CUDNN_PATCHLEVEL 0

#define CUDNN_VERSION (CUDNN_MAJOR * 10000 + CUDNN_MINOR * 100 + CUDNN_PATCHLEVEL)

/* cannot use constexpr here since this is a C-only file */
/* Below is the max SM version this cuDNN library is aware of and supports natively */

#define CUDNN_MAX_SM_MAJOR_NUMBER 12
#define CUDNN_MAX_SM_MINOR_NUMBER 1
#define CUDNN_MAX_DEVICE_VERSION (CUDNN_MAX_SM_MAJOR_NUMBER * 100 + CUDNN_MAX_SM_MINOR_NUMBER * 10)

#endif /* CUDNN_VERSION_H */
"""

_LICENCE = """\
/*
 * Copyright (c) 1993-2023, NVIDIA CORPORATION. All rights reserved.
 *
 * NOTICE TO LICENSEE: ... (licence text; a `#define FAKE_MAJOR 99` here is only a comment)
 */

"""


def cudnn_header(major: int, minor: int, patch: int) -> str:
    scale = 10000 if major >= 9 else 1000   # CUDNN_VERSION scale changed in v9 (docs/devices.md §2)
    return (_LICENCE + "/**\n * \\file: The master cuDNN version file.\n */\n\n"
            "#ifndef CUDNN_VERSION_H_\n#define CUDNN_VERSION_H_\n\n"
            f"#define CUDNN_MAJOR {major}\n#define CUDNN_MINOR {minor}\n#define CUDNN_PATCHLEVEL {patch}\n\n"
            f"#define CUDNN_VERSION (CUDNN_MAJOR * {scale} + CUDNN_MINOR * 100 + CUDNN_PATCHLEVEL)\n\n"
            "#endif /* CUDNN_VERSION_H */\n")


def nvinfer_header(major: int, minor: int, patch: int, build: int, *, enterprise: bool = False) -> str:
    head = (_LICENCE + " //!\n //! \\file NvInferVersion.h\n //!\n //! Defines the TensorRT version\n //!\n"
            "#ifndef NV_INFER_VERSION_H\n#define NV_INFER_VERSION_H\n\n")
    if enterprise:   # TensorRT 10.11+: NV_TENSORRT_* are defined via TRT_*_ENTERPRISE
        body = (f"#define TRT_MAJOR_ENTERPRISE {major}\n#define TRT_MINOR_ENTERPRISE {minor}\n"
                f"#define TRT_PATCH_ENTERPRISE {patch}\n#define TRT_BUILD_ENTERPRISE {build}\n"
                "#define NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE //!< TensorRT major version.\n"
                "#define NV_TENSORRT_MINOR TRT_MINOR_ENTERPRISE //!< TensorRT minor version.\n"
                "#define NV_TENSORRT_PATCH TRT_PATCH_ENTERPRISE //!< TensorRT patch version.\n"
                "#define NV_TENSORRT_BUILD TRT_BUILD_ENTERPRISE //!< TensorRT build number.\n\n")
    else:
        body = (f"#define NV_TENSORRT_MAJOR {major} //!< TensorRT major version.\n"
                f"#define NV_TENSORRT_MINOR {minor} //!< TensorRT minor version.\n"
                f"#define NV_TENSORRT_PATCH {patch} //!< TensorRT patch version.\n"
                f"#define NV_TENSORRT_BUILD {build} //!< TensorRT build number.\n\n")
        if major < 10:  # NV_TENSORRT_SONAME_* are gone in 10.0
            body += (f"#define NV_TENSORRT_SONAME_MAJOR {major} //!< Shared object library major version number.\n"
                     f"#define NV_TENSORRT_SONAME_MINOR {minor} //!< Shared object library minor version number.\n"
                     f"#define NV_TENSORRT_SONAME_PATCH {patch} //!< Shared object library patch version number.\n\n")
    return head + body + "#endif // NV_INFER_VERSION_H\n"


# ---------------------------------------------------------------- headers, whole files

def test_include_guard_does_not_swallow_the_next_define():
    defs = parse_c_defines(CUDNN_H200)
    assert defs["CUDNN_VERSION_H_"] == ""
    assert (defs["CUDNN_MAJOR"], defs["CUDNN_MINOR"], defs["CUDNN_PATCHLEVEL"]) == ("9", "14", "0")
    # the probe output of the real machine had the guard directly above CUDNN_MAJOR
    assert parse_c_defines("#define CUDNN_VERSION_H_\n#define CUDNN_MAJOR 9\n")["CUDNN_MAJOR"] == "9"
    assert parse_c_defines("#define A\n\n#define B 2\n") == {"A": "", "B": "2"}


def test_real_cudnn_header_h200():
    assert parse_cudnn_header(CUDNN_H200) == "9.14.0"
    assert parse_cudnn_header(_LICENCE + CUDNN_H200) == "9.14.0"


@pytest.mark.parametrize("version", [(8, 6, 0), (9, 3, 0), (8, 9, 4)], ids=["jp5", "jp6", "jp6.0"])
def test_jetpack_cudnn_headers(version):
    assert parse_cudnn_header(cudnn_header(*version)) == ".".join(map(str, version))


@pytest.mark.parametrize("version,enterprise,expected", [
    ((8, 5, 2, 2), False, "8.5.2.2"),         # JetPack 5.1.x
    ((10, 3, 0, 30), False, "10.3.0.30"),     # JetPack 6.1/6.2
    ((10, 11, 0, 33), True, "10.11.0.33"),    # 10.11+: via TRT_*_ENTERPRISE
    ((10, 14, 1, 48), True, "10.14.1.48"),
])
def test_real_shaped_nvinfer_headers(version, enterprise, expected):
    text = nvinfer_header(*version, enterprise=enterprise)
    assert "#define NV_INFER_VERSION_H\n\n" in text  # guard, then a blank line
    assert parse_nvinfer_version_header(text) == expected


def test_header_comments_and_odd_shapes():
    text = ("/* #define NV_TENSORRT_MAJOR 7\n   still a comment */\n"
            "// #define NV_TENSORRT_MINOR 9\n"
            "#  define NV_TENSORRT_MAJOR (10) /* a comment */\n"
            "#define NV_TENSORRT_MINOR 3 // trailing\n"
            "#define NV_TENSORRT_PATCH \\\n    0\n"
            "#define NV_TENSORRT_VERSION_FN(x) (x)\n")
    assert parse_nvinfer_version_header(text) == "10.3.0"
    # a macro loop or an expression is not a version
    assert parse_nvinfer_version_header("#define NV_TENSORRT_MAJOR A\n#define A NV_TENSORRT_MAJOR\n"
                                        "#define NV_TENSORRT_MINOR 1\n#define NV_TENSORRT_PATCH 0\n") is None
    assert parse_cudnn_header("#define CUDNN_MAJOR (8 + 1)\n#define CUDNN_MINOR 1\n#define CUDNN_PATCHLEVEL 0\n") is None


# ---------------------------------------------------------------- a real machine's probe output

def test_h200_probe_output_exact():
    fp = parse_probe_output(H200)
    want = {"kind": "gpu", "gpu_name": "NVIDIA H200", "compute_capability": "9.0",
            "compute_capability_source": "nvidia-smi", "driver_version": "580.159.04",
            "cuda": "13.0", "cuda_full": "13.0.88", "cudnn": "9.14.0", "tensorrt": None,
            "tensorrt_build": None, "l4t": None, "jetpack": None, "arch": "x86_64",
            "gpu_memory_mib": "143771", "gpu_pci_device_id": "0x233510DE", "gpu_count": "1",
            "onnxruntime": "1.30.0", "python": "3.12.3", "cpu_model": "Intel(R) Xeon(R) Processor",
            "version_conflicts": None}
    assert {k: fp[k] for k in want} == want
    # the header (not only the hi-held libcudnn9-cuda-13 deb) gave cuDNN: both agree
    assert parse_cudnn_header(split_sections(H200)["cudnn_header"]) == "9.14.0"
    flags = fp["cpu_flags"]
    assert flags == sorted(flags) and {"avx512f", "avx2", "amx_tile", "sha_ni", "vaes", "gfni"} <= set(flags)
    assert "smep" not in flags and "hypervisor" not in flags


def test_h200_tensorrt_target_fails_clearly():
    fp = parse_probe_output(H200)
    with pytest.raises(ProbeError) as err:
        hwclass.hardware_class("tensorrt", fp, target="h200-01")
    text = str(err.value)
    assert "h200-01" in text and "TensorRT not found" in text and "no NVIDIA GPU" not in text
    assert "install TensorRT" in err.value.hint and 'backend = "onnxruntime"' in err.value.hint
    assert "doit fingerprint:h200-01" in err.value.hint
    # the same machine is a fine ONNX Runtime class
    assert hwclass.hardware_class("onnxruntime", fp).label.startswith("cpu-x86_64-avx512f-ort1.30.0")


def test_cpu_fingerprint_for_tensorrt_target_fails_clearly():
    fp = probe_local()
    with pytest.raises(ProbeError, match="no NVIDIA GPU") as err:
        hwclass.require_class_fields("tensorrt", fp, target="local")
    assert 'backend = "onnxruntime"' in err.value.hint
    with pytest.raises(ProbeError, match="ONNX Runtime not found"):
        hwclass.hardware_class("onnxruntime", {**fp, "onnxruntime": None})
    with pytest.raises(ProbeError, match="unknown backend"):
        hwclass.hardware_class("tvm", fp)


def test_cudnn_downgrade_is_drift_and_a_new_class():
    jp6 = parse_probe_output(H200.replace("#define CUDNN_MINOR 14", "#define CUDNN_MINOR 3")
                             .replace("9.14.0.64-1", "9.3.0.75-1"))
    jp6 = {**jp6, "tensorrt": "10.3.0"}
    assert jp6["cudnn"] == "9.3.0"
    old_header = split_sections(H200)["cudnn_header"]
    jp5_text = H200.replace(old_header, cudnn_header(8, 6, 0).rstrip("\n")).replace(
        "hi |libcudnn9-cuda-13 9.14.0.64-1", "ii |libcudnn8 8.6.0.166-1+cuda11.4")
    jp5 = {**parse_probe_output(jp5_text), "tensorrt": "10.3.0"}
    assert jp5["cudnn"] == "8.6.0"
    assert hwclass.describe_change(jp6, jp5, "tensorrt") == ["cuDNN 9.3.0 → 8.6.0"]
    assert hwclass.hardware_class("tensorrt", jp6) != hwclass.hardware_class("tensorrt", jp5)
    # ONNX Runtime does not care about cuDNN
    assert hwclass.describe_change(jp6, jp5, "onnxruntime") == []


# ---------------------------------------------------------------- the probe script's header search

def _probe(root: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "KILN_PROBE_ROOT": str(root), "HOME": str(tmp_path)}
    return subprocess.run(["sh", "-c", PROBE_SCRIPT, "kiln-probe", "", "/nonexistent/python3"],
                          capture_output=True, text=True, timeout=60, env=env)


def test_probe_finds_h200_layout_symlinked_header(tmp_path):
    """/usr/include/x86_64-linux-gnu/cudnn_version.h -> cudnn_version_v9.h, sent whole."""
    inc = tmp_path / "root/usr/include/x86_64-linux-gnu"
    inc.mkdir(parents=True)
    (inc / "cudnn_version_v9.h").write_text(_LICENCE + CUDNN_H200)
    (inc / "cudnn_version.h").symlink_to("cudnn_version_v9.h")
    out = _probe(tmp_path / "root", tmp_path).stdout
    assert split_sections(out)["cudnn_header"] == _LICENCE + CUDNN_H200.rstrip("\n")
    assert parse_probe_output(out)["cudnn"] == "9.14.0"


def test_probe_finds_a_triplet_cudnn_version_h_alone(tmp_path):
    assert "/usr/include/*-linux-gnu/cudnn_version.h" in CUDNN_HEADERS
    inc = tmp_path / "root/usr/include/x86_64-linux-gnu"
    inc.mkdir(parents=True)
    (inc / "cudnn_version.h").write_text(CUDNN_H200)
    assert parse_probe_output(_probe(tmp_path / "root", tmp_path).stdout)["cudnn"] == "9.14.0"


@pytest.mark.parametrize("cudnn,trt,enterprise", [((8, 6, 0), (8, 5, 2, 2), False),
                                                  ((9, 3, 0), (10, 3, 0, 30), False),
                                                  ((9, 3, 0), (10, 11, 0, 33), True)],
                         ids=["jp5", "jp6", "trt10.11"])
def test_probe_finds_jetson_aarch64_headers(tmp_path, cudnn, trt, enterprise):
    inc = tmp_path / "root/usr/include/aarch64-linux-gnu"
    inc.mkdir(parents=True)
    (inc / f"cudnn_version_v{cudnn[0]}.h").write_text(cudnn_header(*cudnn))
    (inc / "NvInferVersion.h").write_text(nvinfer_header(*trt, enterprise=enterprise))
    # the alternatives alias, as the debs install it
    (tmp_path / "root/etc/alternatives").mkdir(parents=True)
    (tmp_path / "root/etc/alternatives/cudnn_version_h").symlink_to(inc / f"cudnn_version_v{cudnn[0]}.h")
    (tmp_path / "root/usr/include/cudnn_version.h").symlink_to(tmp_path / "root/etc/alternatives/cudnn_version_h")
    fp = parse_probe_output(_probe(tmp_path / "root", tmp_path).stdout)
    assert fp["cudnn"] == ".".join(map(str, cudnn))
    assert fp["tensorrt"] == ".".join(map(str, trt[:3])) and fp["tensorrt_build"] == ".".join(map(str, trt))


# ---------------------------------------------------------------- one cpuinfo parser, one ISA set

X86_TWO_CPUS = split_sections(H200)["cpuinfo"] + "\n\n" + split_sections(H200)["cpuinfo"].replace(
    "processor\t: 0", "processor\t: 1").replace(" avx512f ", " ")
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 62.50
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp uscat ilrcpc flagm paca pacg
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd42
CPU revision\t: 1

processor\t: 1
Features\t: fp asimd

Hardware\t: some SoC
"""


def test_isa_set_is_the_union_of_the_old_two():
    # the old SSH-path set and the old local-path regex set
    assert {"aes", "bmi1", "bmi2", "movbe", "pclmulqdq", "popcnt", "sha_ni", "sse", "sse2", "vaes", "gfni",
            "sse4_1", "sse4_2", "ssse3", "avx", "avx2", "fma", "f16c", "avx_vnni", "asimd", "asimdhp",
            "asimddp", "asimdfhm", "sve", "sve2", "sme", "i8mm", "bf16", "fphp", "neon"} <= ISA_FLAGS
    info = parse_cpuinfo(ARM_CPUINFO)
    assert info == {"cpu_model": "ARM implementer 0x41 part 0xd42",
                    "cpu_flags": ["aes", "asimd", "asimddp", "asimdhp", "asimdrdm", "atomics", "fp", "fphp"]}
    assert parse_cpuinfo("") == {"cpu_model": None, "cpu_flags": []}


def _as_probe_output(cpuinfo: str) -> str:
    return (f"@@kiln:probe@@\n1\n\n@@kiln:end@@\n@@kiln:uname_m@@\n{platform.machine()}\n\n@@kiln:end@@\n"
            f"@@kiln:cpuinfo@@\n{cpuinfo}\n\n@@kiln:end@@\n"
            f"@@kiln:onnxruntime@@\n{package_version('onnxruntime')}\n@@kiln:end@@\n")


@pytest.mark.parametrize("text", [X86_TWO_CPUS, ARM_CPUINFO], ids=["x86-2cpu", "arm"])
def test_local_and_ssh_paths_agree_on_the_same_cpuinfo(tmp_path, text):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    local = probe_local(cpuinfo=path)
    # the shell probe sends only the first processor block: run it for real on the same text
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "proc/cpuinfo").write_text(text)
    shell = split_sections(_probe(root, tmp_path).stdout)["cpuinfo"]
    for remote in (parse_probe_output(_as_probe_output(text)), parse_probe_output(_as_probe_output(shell))):
        assert (remote["cpu_model"], remote["cpu_flags"]) == (local["cpu_model"], local["cpu_flags"])
        assert hwclass.hardware_class("onnxruntime", remote) == hwclass.hardware_class("onnxruntime", local)
    assert "avx512f" in local["cpu_flags"] or text is ARM_CPUINFO   # CPU 0's flags, not CPU 1's


def test_this_machine_local_vs_real_probe_script_same_class():
    local = probe_local()
    with LocalTransport("x") as t:
        remote = probe_remote(t, python=sys.executable)   # the interpreter that has onnxruntime
    assert isinstance(remote["cpu_flags"], list) and remote["cpu_flags"] == local["cpu_flags"]
    assert remote["cpu_model"] == local["cpu_model"] and remote["arch"] == local["arch"]
    assert remote["onnxruntime"] == local["onnxruntime"]
    assert hwclass.hardware_class("onnxruntime", remote).id == hwclass.hardware_class("onnxruntime", local).id


def test_this_machine_over_real_ssh_same_class(new_fleet):
    """A simulated "cpu" device shares the host's /proc/cpuinfo: over real SSH, same class."""
    sim = new_fleet()
    sim.add_device("cpu-probe", "cpu")
    sim.start()
    sim.write_known_hosts(sim.known_hosts_path)
    sim.write_ssh_config()
    with sim.transport("cpu-probe") as t:
        remote = probe_remote(t, python=sys.executable)
    local = probe_local()
    assert remote["kind"] == "cpu" and remote["cpu_flags"] == local["cpu_flags"]
    assert hwclass.hardware_class("onnxruntime", remote).id == hwclass.hardware_class("onnxruntime", local).id


# ---------------------------------------------------------------- hygiene

def test_devices_import_without_state_doit_or_heavy_modules():
    code = ("import sys, threading; before = threading.active_count()\n"
            "import kiln.devices.nvidia, kiln.devices.fingerprint, kiln.devices.hwclass, "
            "kiln.devices.probe_script, kiln.devices.cpuinfo\n"
            "bad = [m for m in ('doit', 'torch', 'onnx', 'onnxruntime', 'boto3', 'paramiko', 'fabric') "
            "if m in sys.modules]\n"
            "assert not bad, bad\nassert threading.active_count() == before\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_no_file_of_devices_cites_a_path_outside_the_repo():
    mine = list((REPO / "kiln/devices").glob("*.py")) + list(REPO.glob("tests/test_devices*.py")) + \
        [REPO / "docs/devices.md"]
    for path in mine:
        text = path.read_text()
        assert "/work/" + "shared" not in text and "../" + "shared" not in text, path
        assert "facts " + "§" not in text, path
    assert "docs/devices.md §" in (REPO / "kiln/devices/nvidia.py").read_text()


def test_package_version_agrees_with_importlib_metadata_for_every_installed_distribution():
    import importlib.metadata
    dists = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()}
    assert len(dists) > 20
    wrong = {n: (package_version(n), v) for n, v in dists.items() if package_version(n) != v}
    assert wrong == {}
    assert package_version("no-such-distribution-kiln") is None
