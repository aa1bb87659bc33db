"""Simulated devices: one real OpenSSH `sshd` per device, each in its own mount namespace.

Every device is `sshd -D -f <its sshd_config>` listening on 127.0.0.1:<its port>
with its own ed25519 host key, started as

    unshare --mount --propagation private sh -c '<mounts>; <write files>; exec sshd -D ...'

so that it has its own view of the files a probe or a builder looks at, while
sharing the rest of the host (so /tmp, python3, coreutils... work as usual):

- overlays (per-device upper dirs, on a tmpfs of the namespace) on /etc, /usr and
  /var/lib/dpkg: the device's
  /etc/nv_tegra_release, /usr/local/cuda/version.json (+ bin/nvcc),
  /usr/include/aarch64-linux-gnu/{NvInferVersion.h,cudnn_version_v8|v9.h},
  /usr/include/cudnn_version.h (-> /etc/alternatives, like the debs),
  /usr/src/tensorrt/bin/trtexec (a wrapper that execs tests/fleet/trtexec_sim.py
  with this device's KILN_SIM_* environment),
  /usr/lib/python3/dist-packages/tensorrt/ (the system python3's bindings: the simulated
  TensorRT Python API of tests/fleet/trt_python/, one module per area) and .../cuda/ (cuda-python's
  cudart, tests/fleet/cuda_python/), /usr/sbin/nvpmodel,
  /usr/bin/nvidia-smi (JetPack 6 only), and dpkg records (nvidia-l4t-core,
  nvidia-jetpack, libnvinfer, libcudnn, cuda-toolkit) in /var/lib/dpkg/status;
- a bind of a per-device folder on /sys/firmware, holding
  devicetree/base/{model,compatible} (NUL-terminated, as on a Jetson).
  /proc/device-tree cannot be simulated: it is a procfs symlink to
  /sys/firmware/devicetree/base on a real Jetson, procfs cannot be overlaid and
  has no such entry on x86, so probes should fall back to the /sys path (which
  is also correct on real devices);
- a bind of a per-device folder on /srv, so two devices deploying to
  /srv/kiln/... do not collide (`Fleet.srv(name)` is that folder, seen from the host);
- root's home is a per-device (empty) folder (the device's /etc/passwd says so):
  the host's ~/.bashrc, which bash sources for every SSH command, stays out of
  the devices (it cost 0.4 s per command here), and ~/.cache etc. are per device.

Every start of something that loads TensorRT/CUDA on a real device (each trtexec run, --help
included, and each import of the `tensorrt` package) is logged in the device's
state/trt_invocations.log: `Fleet.trt_invocations(name)`.

Requires root (mount namespaces, overlayfs) and /usr/sbin/sshd; `unsupported_reason()`
says why not, for a visible pytest.skip. `stop()` kills every process of every
device namespace (sessions and the commands they started included).
"""
from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
HERE = Path(__file__).resolve().parent
TRTEXEC_SIM = HERE / "trtexec_sim.py"
START_TIMEOUT = 15.0


# ----------------------------------------------------------------------------- profiles

@dataclass(frozen=True)
class Profile:
    """What a device is: the files and tools a probe or a builder finds on it."""

    name: str
    description: str
    board_model: str | None = None          # /sys/firmware/devicetree/base/model
    compatible: tuple[str, ...] = ()        # .../compatible, most specific first
    tegra_release: str | None = None        # /etc/nv_tegra_release (full text)
    debs: tuple[tuple[str, str], ...] = ()  # (package, version) recorded in dpkg status
    trt: str | None = None                  # "8.5.2.2" (major.minor.patch.build)
    cuda_json: dict | None = None           # /usr/local/cuda/version.json
    nvcc_release: tuple[str, str] | None = None  # ("11.4", "V11.4.315") for nvcc --version
    cudnn: str | None = None                # "8.6.0"
    compute: str | None = None              # "8.7"
    gpu: str | None = None                  # trtexec "Selected Device" / SoC GPU name
    power_mode: tuple[str, int] | None = None
    nvidia_smi: dict | None = None          # field -> value, JetPack 6 only
    extra_files: tuple[tuple[str, str], ...] = ()
    hidden: tuple[str, ...] = ()            # host files this device does not have (e.g. /usr/bin/sha256sum)
    dla_cores: int = 0                      # DLA cores trtexec may use (--useDLACore), per module (docs/devices.md §9)

    @property
    def trt3(self) -> str | None:
        return ".".join(self.trt.split(".")[:3]) if self.trt else None

    def sim_env(self) -> dict[str, str]:
        """KILN_SIM_* variables for trtexec_sim.py (KILN_SIM_STATE is added per device)."""
        if not self.trt:
            return {}
        return {"KILN_SIM_TRT_VERSION": self.trt, "KILN_SIM_COMPUTE": self.compute or "",
                "KILN_SIM_GPU": self.gpu or "", "KILN_SIM_DLA_CORES": str(self.dla_cores)}


_R35_4_1 = ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
            "DATE: Tue Aug  1 19:57:35 UTC 2023\n")
# GCID/DATE of 36.4.3 are illustrative (the line format is the documented one)
_R36_4_3 = ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
            "DATE: Wed Jan  8 01:49:37 UTC 2025\n"
            "# KERNEL_VARIANT: oot\n"
            "TARGET_USERSPACE_LIB_DIR=nvidia\n"
            "TARGET_USERSPACE_LIB_DIR_PATH=usr/lib/aarch64-linux-gnu/nvidia\n")

_JP5_DEBS = (("nvidia-l4t-core", "35.4.1-20230801124926"), ("nvidia-jetpack", "5.1.2-b104"),
             ("libnvinfer8", "8.5.2-1+cuda11.4"), ("tensorrt", "8.5.2.2-1+cuda11.4"),
             ("python3-libnvinfer", "8.5.2-1+cuda11.4"), ("libcudnn8", "8.6.0.166-1+cuda11.4"),
             ("cuda-toolkit-11-4", "11.4.19-1"))
_JP5_CUDA = {"cuda": {"name": "CUDA SDK", "version": "11.4.19"},
             "cuda_cudart": {"name": "CUDA Runtime (cudart)", "version": "11.4.298"},
             "cuda_nvcc": {"name": "CUDA NVCC", "version": "11.4.315"}}
_JP6_DEBS = (("nvidia-l4t-core", "36.4.3-20250107174145"), ("nvidia-jetpack", "6.2+b77"),
             ("libnvinfer10", "10.3.0.30-1+cuda12.5"), ("tensorrt", "10.3.0.30-1+cuda12.5"),
             ("python3-libnvinfer", "10.3.0.30-1+cuda12.5"), ("libcudnn9-cuda-12", "9.3.0.75-1"))
_JP6_CUDA = {"cuda": {"name": "CUDA SDK", "version": "12.6.20241114"},
             "cuda_cudart": {"name": "CUDA Runtime (cudart)", "version": "12.6.68"},
             "cuda_nvcc": {"name": "CUDA NVCC", "version": "12.6.68"}}
_AGX_ORIN = ("NVIDIA Jetson AGX Orin Developer Kit",
             ("nvidia,p3737-0000+p3701-0005", "nvidia,p3701-0005", "nvidia,tegra234"))

PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("orin-jp5", "AGX Orin, JetPack 5.1.2 (L4T 35.4.1, TRT 8.5.2, CUDA 11.4, cuDNN 8.6.0)",
            board_model=_AGX_ORIN[0], compatible=_AGX_ORIN[1], tegra_release=_R35_4_1, debs=_JP5_DEBS,
            trt="8.5.2.2", cuda_json=_JP5_CUDA, nvcc_release=("11.4", "V11.4.315"), cudnn="8.6.0",
            compute="8.7", gpu="Orin", power_mode=("MAXN", 0), dla_cores=2),
    Profile("orin-jp6", "AGX Orin, JetPack 6.2 (L4T 36.4.3, TRT 10.3.0, CUDA 12.6, cuDNN 9.3.0)",
            board_model=_AGX_ORIN[0], compatible=_AGX_ORIN[1], tegra_release=_R36_4_3, debs=_JP6_DEBS,
            trt="10.3.0.30", cuda_json=_JP6_CUDA, nvcc_release=("12.6", "V12.6.68"), cudnn="9.3.0",
            compute="8.7", gpu="Orin", power_mode=("MAXN", 0),
            nvidia_smi={"name": "Orin (nvgpu)", "compute_cap": "8.7", "driver_version": "540.4.0",
                        "memory.total": "[N/A]", "pci.device_id": "[N/A]", "uuid": "[N/A]",
                        "pci.bus_id": "[N/A]"}, dla_cores=2),
    Profile("xavier-jp5", "AGX Xavier, JetPack 5.1.2 (L4T 35.4.1, TRT 8.5.2, CUDA 11.4, cuDNN 8.6.0)",
            board_model="NVIDIA Jetson AGX Xavier Developer Kit",
            compatible=("nvidia,p2972-0000", "nvidia,tegra194"), tegra_release=_R35_4_1, debs=_JP5_DEBS,
            trt="8.5.2.2", cuda_json=_JP5_CUDA, nvcc_release=("11.4", "V11.4.315"), cudnn="8.6.0",
            compute="7.2", gpu="Xavier", power_mode=("MAXN", 0), dla_cores=2),
    Profile("cpu", "plain CPU box (no NVIDIA files)"),
)}


@dataclass(frozen=True)
class FileSpec:
    content: bytes | None = None   # None and no link: the file must not exist
    mode: int = 0o644
    link: str | None = None


def _nvinfer_header(trt: str) -> str:
    major, minor, patch, build = (trt.split(".") + ["0"] * 4)[:4]
    lines = ["/*", " * SPDX-License-Identifier: Apache-2.0 (simulated header)", " */", "",
             "#ifndef NV_INFER_VERSION_H", "#define NV_INFER_VERSION_H", "",
             f"#define NV_TENSORRT_MAJOR {major} //!< TensorRT major version.",
             f"#define NV_TENSORRT_MINOR {minor} //!< TensorRT minor version.",
             f"#define NV_TENSORRT_PATCH {patch} //!< TensorRT patch version.",
             f"#define NV_TENSORRT_BUILD {build} //!< TensorRT build number.", ""]
    if int(major) < 10:
        lines += [f"#define NV_TENSORRT_SONAME_MAJOR {major} //!< Shared object library major version number.",
                  f"#define NV_TENSORRT_SONAME_MINOR {minor} //!< Shared object library minor version number.",
                  f"#define NV_TENSORRT_SONAME_PATCH {patch} //!< Shared object library patch version number.",
                  ""]
    else:
        lines += ["#define NV_TENSORRT_LWS_MAJOR 0 //!< TensorRT LWS major version.",
                  "#define NV_TENSORRT_LWS_MINOR 0 //!< TensorRT LWS minor version.",
                  "#define NV_TENSORRT_LWS_PATCH 0 //!< TensorRT LWS patch version.", "",
                  "#define NV_TENSORRT_RELEASE_TYPE_EARLY_ACCESS 0         //!< An early access release",
                  "#define NV_TENSORRT_RELEASE_TYPE_RELEASE_CANDIDATE 1    //!< A release candidate",
                  "#define NV_TENSORRT_RELEASE_TYPE_GENERAL_AVAILABILITY 2 //!< A final release", "",
                  "#define NV_TENSORRT_RELEASE_TYPE NV_TENSORRT_RELEASE_TYPE_GENERAL_AVAILABILITY", ""]
    lines += ["#endif // NV_INFER_VERSION_H", ""]
    return "\n".join(lines)


def _cudnn_header(version: str) -> str:
    major, minor, patch = version.split(".")[:3]
    scale = "10000" if int(major) >= 9 else "1000"
    return (f"/**\n * \\file: The master cuDNN version file (simulated).\n */\n\n"
            f"#ifndef CUDNN_VERSION_H_\n#define CUDNN_VERSION_H_\n\n"
            f"#define CUDNN_MAJOR {major}\n#define CUDNN_MINOR {minor}\n#define CUDNN_PATCHLEVEL {patch}\n\n"
            f"#define CUDNN_VERSION (CUDNN_MAJOR * {scale} + CUDNN_MINOR * 100 + CUDNN_PATCHLEVEL)\n\n"
            f"#endif /* CUDNN_VERSION_H */\n")


def _dpkg_stanza(package: str, version: str) -> str:
    return (f"Package: {package}\nStatus: install ok installed\nPriority: optional\nSection: libs\n"
            f"Installed-Size: 1\nMaintainer: NVIDIA Corporation (simulated)\nArchitecture: all\n"
            f"Version: {version}\nDescription: {package} (enginekiln fleet simulator)\n\n")


def _sh(text: str) -> bytes:
    return ("#!/bin/sh\n" + text).encode()


def profile_files(profile: Profile, *, state_dir: Path, python: str, trtexec_sim: Path,
                  sim_env: dict[str, str] | None = None) -> dict[str, FileSpec]:
    """Every managed path of a device view -> what it must be for `profile`."""
    files: dict[str, FileSpec] = {}
    absent = FileSpec()
    fw = "/sys/firmware/devicetree/base"
    files[f"{fw}/model"] = FileSpec((profile.board_model + "\0").encode()) if profile.board_model else absent
    files[f"{fw}/compatible"] = (FileSpec("".join(c + "\0" for c in profile.compatible).encode())
                                 if profile.compatible else absent)
    files["/etc/nv_tegra_release"] = FileSpec(profile.tegra_release.encode()) if profile.tegra_release else absent
    files["/usr/local/cuda/version.json"] = (FileSpec((json.dumps(profile.cuda_json, indent=3) + "\n").encode())
                                             if profile.cuda_json else absent)
    if profile.nvcc_release:
        rel, ver = profile.nvcc_release
        files["/usr/local/cuda/bin/nvcc"] = FileSpec(_sh(
            'case "$1" in --version|-V) ;; *) echo "nvcc (simulated): only --version" >&2; exit 1;; esac\n'
            "cat <<'EOF'\nnvcc: NVIDIA (R) Cuda compiler driver\nCopyright (c) 2005-2024 NVIDIA Corporation\n"
            "Built on Wed_Aug_14_10:10:22_PDT_2024\n"
            f"Cuda compilation tools, release {rel}, {ver}\nBuild cuda_{rel}.r{rel}/compiler.34714021_0\nEOF\n"),
            0o755)
    else:
        files["/usr/local/cuda/bin/nvcc"] = absent
    triplet = "/usr/include/aarch64-linux-gnu"
    files[f"{triplet}/NvInferVersion.h"] = FileSpec(_nvinfer_header(profile.trt).encode()) if profile.trt else absent
    for v in ("8", "9"):
        if profile.cudnn and profile.cudnn.split(".")[0] == v:
            files[f"{triplet}/cudnn_version_v{v}.h"] = FileSpec(_cudnn_header(profile.cudnn).encode())
            files["/etc/alternatives/cudnn_version_h"] = FileSpec(link=f"{triplet}/cudnn_version_v{v}.h")
        else:
            files[f"{triplet}/cudnn_version_v{v}.h"] = absent
    if profile.cudnn:
        files["/usr/include/cudnn_version.h"] = FileSpec(link="/etc/alternatives/cudnn_version_h")
    else:
        files["/etc/alternatives/cudnn_version_h"] = absent
        files["/usr/include/cudnn_version.h"] = absent
    if profile.trt:
        env = {**profile.sim_env(), "KILN_SIM_STATE": str(state_dir), **(sim_env or {})}
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
        sim = shlex.quote(str(trtexec_sim))
        files["/usr/src/tensorrt/bin/trtexec"] = FileSpec(_sh(
            f"# enginekiln fleet simulator: TensorRT {profile.trt3} on {profile.gpu} (SM {profile.compute})\n"
            f"{exports}"
            f"if [ ! -f {sim} ]; then\n"
            f"  echo \"[E] trtexec simulator missing: {trtexec_sim}\" >&2\n"
            f"  echo '&&&& FAILED TensorRT.trtexec [TensorRT v{_trt_banner(profile.trt)}] # trtexec' \"$*\"\n"
            f"  exit 1\nfi\n"
            f"exec {shlex.quote(python)} {sim} \"$@\"\n"), 0o755)
    else:
        files["/usr/src/tensorrt/bin/trtexec"] = absent
    # the TensorRT python bindings (python3-libnvinfer) in the system python3 of the device: the
    # version is a literal, as in the real package; importing it is logged as a TensorRT start
    env = {**profile.sim_env(), **(sim_env or {})}
    for path, text in _python_packages(profile, state_dir, trtexec_sim, env).items():
        files[path] = FileSpec(text.encode()) if text is not None else absent
    # a python3 as on a Jetson, with numpy (the agent's comparisons) and the bindings: the host's
    # system python3 has no numpy, so this is the fleet's interpreter with only the simulated
    # packages added to its path (kiln's refit script and agent run with it: target `python`)
    bindings = bool(profile.trt) and f"{DIST_PACKAGES}/tensorrt/__init__.py" not in profile.hidden
    files[JETSON_PYTHON] = (FileSpec(_sh(f'PYTHONPATH={SIM_SITE}${{PYTHONPATH:+:$PYTHONPATH}} '
                                         f'exec {shlex.quote(python)} "$@"\n'), 0o755) if profile.trt else absent)
    for package in ("tensorrt", "cuda"):
        files[f"{SIM_SITE}/{package}"] = FileSpec(link=f"{DIST_PACKAGES}/{package}") if bindings else absent
    if profile.power_mode:
        name, num = profile.power_mode
        files["/usr/sbin/nvpmodel"] = FileSpec(_sh(
            'case "$1" in -q) ;; *) echo "nvpmodel (simulated): only -q" >&2; exit 1;; esac\n'
            f"printf 'NV Power Mode: %s\\n%s\\n' {shlex.quote(name)} {num}\n"), 0o755)
    else:
        files["/usr/sbin/nvpmodel"] = absent
    if profile.nvidia_smi:
        cases = "".join(f"    {shlex.quote(k)}) v={shlex.quote(v)};;\n" for k, v in profile.nvidia_smi.items())
        files["/usr/bin/nvidia-smi"] = FileSpec(_sh(
            'q=; nounits=; header=1\nfor a in "$@"; do case "$a" in\n'
            '  --query-gpu=*) q="${a#--query-gpu=}";;\n'
            '  --format=*) case "$a" in *noheader*) header=;; esac;;\n'
            '  *) ;; esac; done\n'
            '[ -n "$q" ] || { echo "nvidia-smi (simulated): use --query-gpu" >&2; exit 1; }\n'
            'out=; hdr=\nIFS=,\nfor f in $q; do\n  case "$f" in\n'
            f"{cases}"
            '    *) echo "Field \\"$f\\" is not a valid field to query."; echo; exit 2;;\n  esac\n'
            '  out="${out:+$out, }$v"; hdr="${hdr:+$hdr, }$f"\ndone\n'
            '[ -n "$header" ] && echo "$hdr"\necho "$out"\n'), 0o755)
    else:
        files["/usr/bin/nvidia-smi"] = absent
    status = Path("/var/lib/dpkg/status").read_text() if Path("/var/lib/dpkg/status").exists() else ""
    if not status.endswith("\n\n") and status:
        status += "\n" if status.endswith("\n") else "\n\n"
    files["/var/lib/dpkg/status"] = FileSpec((status + "".join(_dpkg_stanza(p, v) for p, v in profile.debs)).encode())
    for path, text in profile.extra_files:
        files[path] = FileSpec(text.encode())
    for path in profile.hidden:
        files[path] = absent
    return files


TRT_PYTHON = HERE / "trt_python"     # the simulated `tensorrt` package, one module per area
CUDA_PYTHON = HERE / "cuda_python"   # the simulated `cuda` package (cuda-python's cudart)
DIST_PACKAGES = "/usr/lib/python3/dist-packages"
JETSON_PYTHON = "/usr/local/bin/kiln-sim-python3"   # numpy + the simulated bindings (see profile_files)
SIM_SITE = "/usr/local/lib/kiln-sim-python"          # holds links to the simulated tensorrt and cuda only


def _python_packages(profile: Profile, state_dir: Path, trtexec_sim: Path, env: dict[str, str]) -> dict[str, str | None]:
    """The device's `tensorrt` and `cuda` packages (path -> text; None = absent). A profile that
    hides tensorrt/__init__.py has neither (no python3-libnvinfer)."""
    init = f"{DIST_PACKAGES}/tensorrt/__init__.py"
    present = bool(profile.trt) and init not in profile.hidden
    out: dict[str, str | None] = {}
    for folder, package in ((TRT_PYTHON, "tensorrt"), (CUDA_PYTHON, "cuda")):
        for module in sorted(folder.glob("*.py")):
            path = f"{DIST_PACKAGES}/{package}/{module.name}"
            if not present:
                out[path] = None
            elif path == init:
                out[path] = _tensorrt_init(profile, state_dir, trtexec_sim, env)
            else:
                out[path] = module.read_text()
    return out


def _tensorrt_init(profile: Profile, state_dir: Path, trtexec_sim: Path, env: dict[str, str]) -> str:
    """`tensorrt/__init__.py` for the device's python3: trt_python/__init__.py with `__version__` as
    the bindings report it (JP5 "8.5.2.2", JP6 "10.3.0") and the device's identity."""
    version = profile.trt if int(profile.trt.split(".")[0]) < 10 else profile.trt3
    identity = {"state": str(state_dir), "library": profile.trt, "compute": profile.compute or "", "gpu": profile.gpu or "",
                "trtexec_sim": str(trtexec_sim), "build_seconds": env.get("KILN_SIM_BUILD_SECONDS", "0.2"),
                "dla_cores": profile.dla_cores,
                "refit_ratio": env.get("KILN_SIM_REFIT_RATIO", "0.2"), "refit_fault": env.get("KILN_SIM_REFIT_FAULT", "")}
    lines = []
    for line in (TRT_PYTHON / "__init__.py").read_text().splitlines():
        if line.endswith("# kiln-sim: version"):
            line = f"__version__ = {version!r}"
        elif line.endswith("# kiln-sim: identity"):
            line = f"_SIM = {identity!r}"
        lines.append(line)
    return f"# enginekiln fleet simulator: TensorRT {profile.trt3} python bindings\n" + "\n".join(lines) + "\n"


def _passwd_with_home(user: str, home: Path) -> bytes:
    lines = []
    for line in Path("/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if len(fields) == 7 and fields[0] == user:
            fields[5] = str(home)
        lines.append(":".join(fields))
    return ("\n".join(lines) + "\n").encode()


def _trt_banner(trt: str) -> str:
    major, minor, patch = (int(x) for x in trt.split(".")[:3])
    return str(major * 10000 + minor * 100 + patch) if major >= 10 else str(major * 1000 + minor * 100 + patch)


# Runs inside the device's mount namespace (before sshd starts, and on upgrade via nsenter).
_APPLY = r'''
import json, os, sys
spec = json.load(open(sys.argv[1]))
for path, f in sorted(spec.items()):
    d = os.path.dirname(path)
    if f["link"] is None and f["content"] is None:
        if os.path.lexists(path):
            os.unlink(path)
            while d not in ("/", ""):  # drop folders the profile created and left empty
                try:
                    os.rmdir(d)
                except OSError:
                    break
                d = os.path.dirname(d)
        continue
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, ".%s.kiln-sim-tmp" % os.path.basename(path))
    if os.path.lexists(tmp):
        os.unlink(tmp)
    if f["link"] is not None:
        os.symlink(f["link"], tmp)
    else:
        with open(tmp, "wb") as out:
            out.write(bytes.fromhex(f["content"]))
        os.chmod(tmp, f["mode"])
    os.replace(tmp, path)
'''


# ----------------------------------------------------------------------------- environment checks

_support_lock = threading.Lock()
_support: dict[str, str | None] = {}


def unsupported_reason() -> str | None:
    """None if simulated devices can run here, else why not (for pytest.skip)."""
    with _support_lock:
        if "reason" in _support:
            return _support["reason"]
        _support["reason"] = _check_support()
        return _support["reason"]


def _check_support() -> str | None:
    if not sys.platform.startswith("linux"):
        return "simulated devices need Linux (mount namespaces)"
    if os.geteuid() != 0:
        return "simulated devices need root (mount namespaces + overlayfs); CI runs as root"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} not found: apt-get install -y openssh-server"
    for tool in ("unshare", "nsenter", "ssh-keygen", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not found (util-linux / openssh-client)"
    import tempfile
    with tempfile.TemporaryDirectory(prefix="kiln-sim-check-") as tmp:
        for sub in ("lower", "rw", "merged"):
            os.mkdir(os.path.join(tmp, sub))
        script = (f"mount -t tmpfs tmpfs {tmp}/rw && mkdir {tmp}/rw/upper {tmp}/rw/work && "
                  f"mount -t overlay overlay -o lowerdir={tmp}/lower,upperdir={tmp}/rw/upper,"
                  f"workdir={tmp}/rw/work {tmp}/merged && mount --bind {tmp}/lower {tmp}/merged")
        try:
            proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                  capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unshare/mount not usable: {exc}"
        if proc.returncode != 0:
            return f"mount namespaces/overlayfs not permitted here: {proc.stderr.strip()[:200]}"
    return None


# ----------------------------------------------------------------------------- processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _pids_in_ns(ns: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _mnt_ns(int(entry)) == ns:
            pids.append(int(entry))
    return pids


def _pdeathsig():
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the test process
    except Exception:
        pass


_live_fleets: "weakref.WeakSet[Fleet]" = weakref.WeakSet()


@atexit.register
def _stop_all_fleets() -> None:
    for fleet in list(_live_fleets):
        fleet.stop()


@dataclass
class Device:
    name: str
    profile: Profile
    port: int
    dir: Path
    via: str | None = None
    proc: subprocess.Popen | None = None
    ns: str | None = None
    frozen: bool = False
    host_key_pub: str = ""
    sim_env: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.dir / "sshd.log"

    @property
    def state(self) -> Path:
        return self.dir / "state"


class Fleet:
    """A set of simulated devices under `root` (a fresh folder, e.g. pytest's tmp_path).

    `add_device()` then `start()`; `stop()` always (the pytest fixtures do).
    Connect with `transport(name)` (an SSHTransport through `ssh_config_path`,
    which knows every device as a Host alias with HostName/Port/User/IdentityFile,
    ProxyJump for devices added `via=` a bastion, and `known_hosts_path`).
    """

    def __init__(self, root: Path | str, *, python: str | None = None,
                 trtexec_sim: Path | str | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        #: interpreter for the trtexec wrapper (default: this one, with the project's deps)
        self.python = python or sys.executable
        self.trtexec_sim = Path(trtexec_sim) if trtexec_sim else TRTEXEC_SIM
        self.devices: dict[str, Device] = {}
        self.client_key = self.root / "client_ed25519"
        self.ssh_config_path = self.root / "ssh_config"
        self.known_hosts_path = self.root / "known_hosts"
        self._apply_script = self.root / "apply_files.py"
        self._lock = threading.Lock()
        _live_fleets.add(self)

    # -- setup ---------------------------------------------------------------

    def add_device(self, name: str, profile: str | Profile = "cpu", *, via: str | None = None,
                   sim_env: dict[str, str] | None = None) -> Device:
        """Declare a device (started by start()). `via`: a bastion device name, used with ProxyJump.
        `sim_env`: extra KILN_SIM_* for its trtexec (e.g. {"KILN_SIM_FAIL": "oom"})."""
        if name in self.devices:
            raise ValueError(f"device {name} already exists")
        if via is not None and via not in self.devices:
            raise ValueError(f"bastion {via} must be added before {name}")
        prof = PROFILES[profile] if isinstance(profile, str) else profile
        taken = {x.port for x in self.devices.values()}
        port = _free_port()
        while port in taken:  # the kernel hands a just-closed port out again: 200 devices collided
            port = _free_port()
        d = Device(name, prof, port, self.root / "devices" / name, via=via, sim_env=dict(sim_env or {}))
        for sub in ("", "rw", "firmware", "srv", "state", "home"):
            (d.dir / sub).mkdir(parents=True, exist_ok=True)
        key = d.dir / "ssh_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"kiln-sim-{name}", "-f", str(key)],
                       check=True, capture_output=True)
        d.host_key_pub = (d.dir / "ssh_host_ed25519_key.pub").read_text().split()[0:2]
        d.host_key_pub = " ".join(d.host_key_pub)
        self.devices[name] = d
        return d

    def _ensure_client_key(self) -> None:
        if not self.client_key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kiln-sim-client",
                            "-f", str(self.client_key)], check=True, capture_output=True)
        self._apply_script.write_text(_APPLY)

    def _sshd_config(self, d: Device) -> Path:
        path = d.dir / "sshd_config"
        path.write_text(f"""\
Port {d.port}
ListenAddress 127.0.0.1
HostKey {d.dir}/ssh_host_ed25519_key
PidFile none
AuthorizedKeysFile {self.client_key}.pub
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
StrictModes no
LogLevel VERBOSE
MaxSessions 64
MaxStartups 200:30:400
AllowTcpForwarding yes
PrintMotd no
PrintLastLog no
Subsystem sftp internal-sftp
""")
        return path

    def _spec_file(self, d: Device) -> Path:
        files = profile_files(d.profile, state_dir=d.state, python=self.python, trtexec_sim=self.trtexec_sim,
                              sim_env=d.sim_env)
        files["/etc/passwd"] = FileSpec(_passwd_with_home("root", d.dir / "home"))
        spec = {p: {"content": f.content.hex() if f.content is not None else None, "mode": f.mode, "link": f.link}
                for p, f in files.items()}
        # paths managed by any earlier profile of this device but not by this one: remove
        for p in d.extra.get("managed", ()):
            spec.setdefault(p, {"content": None, "mode": 0o644, "link": None})
        d.extra["managed"] = sorted(set(d.extra.get("managed", ())) | set(spec))
        path = d.dir / "files.json"
        path.write_text(json.dumps(spec))
        return path

    def _launch(self, d: Device) -> None:
        config = self._sshd_config(d)
        spec = self._spec_file(d)
        rw = d.dir / "rw"  # upper and work dirs must be on one filesystem
        u, w = rw / "upper", rw / "work"
        mounts = [
            # overlay upper/work dirs on a tmpfs private to the namespace: works whatever the
            # host's filesystem (an overlayfs upper dir cannot live on overlayfs, e.g. in docker)
            f"mount -t tmpfs -o mode=0755 kiln-sim-rw {rw}",
            f"mkdir -p {u}/etc {u}/usr {u}/dpkg {w}/etc {w}/usr {w}/dpkg",
            f"mount -t overlay kiln-sim-etc -o lowerdir=/etc,upperdir={u}/etc,workdir={w}/etc /etc",
            f"mount -t overlay kiln-sim-usr -o lowerdir=/usr,upperdir={u}/usr,workdir={w}/usr /usr",
            f"mount -t overlay kiln-sim-dpkg -o lowerdir=/var/lib/dpkg,upperdir={u}/dpkg,workdir={w}/dpkg "
            f"/var/lib/dpkg",
            f"mount --bind {d.dir}/firmware /sys/firmware",
            f"mount --bind {d.dir}/srv /srv",
            f"{shlex.quote(self.python)} {self._apply_script} {spec}",
            f"exec {SSHD} -D -f {config} -E {d.log}",
        ]
        with open(d.dir / "launch.err", "wb") as err:
            d.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-ec", "\n".join(mounts)],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True,
                env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
                preexec_fn=_pdeathsig if threading.current_thread() is threading.main_thread() else None)
        d.frozen = False
        d.ns = None

    def _wait_listening(self, devices: list[Device]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        pending = {d.name: d for d in devices}
        while pending:
            for name, d in list(pending.items()):
                text = d.log.read_text(errors="replace") if d.log.exists() else ""
                if f"Server listening on 127.0.0.1 port {d.port}" in text.split("#kiln-start")[-1]:
                    d.ns = _mnt_ns(d.proc.pid)
                    del pending[name]
                elif d.proc.poll() is not None:
                    err = (d.dir / "launch.err").read_text(errors="replace")
                    raise RuntimeError(f"simulated device {name} failed to start (exit {d.proc.returncode}):\n"
                                       f"{err}\n{text[-2000:]}")
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"simulated devices did not start in {START_TIMEOUT}s: {sorted(pending)}")
            if pending:
                time.sleep(0.01)

    def start(self) -> "Fleet":
        """Start every device not running yet (in parallel) and write ssh_config and known_hosts."""
        reason = unsupported_reason()
        if reason:
            raise RuntimeError(reason)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation dir
        self._ensure_client_key()
        self.write_ssh_config()
        self.write_known_hosts(self.known_hosts_path)
        todo = [d for d in self.devices.values() if d.proc is None or d.proc.poll() is not None]
        for attempt in (1, 2):
            for d in todo:
                with open(d.log, "a") as log:
                    log.write("#kiln-start\n")
                self._launch(d)
            try:
                self._wait_listening(todo)
                return self
            except RuntimeError as exc:
                # on a loaded machine a start occasionally dies; one clean retry, then give up
                for d in todo:
                    self.stop_device(d.name)
                if attempt == 2:
                    self.stop()
                    raise
                print(f"fleet sim: retrying start after: {str(exc).splitlines()[0]}", file=sys.stderr)
            except BaseException:
                self.stop()
                raise
        return self

    def start_device(self, name: str) -> None:
        d = self.devices[name]
        if d.proc is not None and d.proc.poll() is None:
            return
        with open(d.log, "a") as log:
            log.write("#kiln-start\n")
        self._launch(d)
        self._wait_listening([d])

    def stop_device(self, name: str) -> None:
        """Kill the device: its sshd, every session and every command it started."""
        d = self.devices[name]
        if d.proc is None:
            return
        # a dead sshd's pid may already belong to someone else: only ask a live one for its namespace
        ns = d.ns or (_mnt_ns(d.proc.pid) if d.proc.poll() is None else None)
        host_ns = _mnt_ns(os.getpid())
        for _ in range(3):
            pids = _pids_in_ns(ns) if ns and ns != host_ns else []
            if d.proc.poll() is None:
                pids.append(d.proc.pid)
            if not pids:
                break
            for pid in set(pids):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        try:
            d.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        d.proc = None
        d.ns = None

    make_unreachable = stop_device

    def freeze(self, name: str) -> None:
        """SIGSTOP the listener: TCP connects succeed (kernel backlog) but no SSH banner ever comes."""
        d = self.devices[name]
        os.kill(d.proc.pid, signal.SIGSTOP)
        d.frozen = True

    def thaw(self, name: str) -> None:
        d = self.devices[name]
        os.kill(d.proc.pid, signal.SIGCONT)
        d.frozen = False

    def stop(self) -> None:
        for name, d in self.devices.items():
            if d.frozen and d.proc is not None and d.proc.poll() is None:
                try:
                    os.kill(d.proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            self.stop_device(name)

    def __enter__(self) -> "Fleet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- changing a device ----------------------------------------------------------

    def upgrade(self, name: str, profile: str | Profile | None = None, *,
                sim_env: dict[str, str] | None = None) -> None:
        """Rewrite the device's files in place for `profile` (e.g. a JetPack upgrade) and/or
        replace the extra KILN_SIM_* environment of its trtexec."""
        d = self.devices[name]
        if profile is not None:
            d.profile = PROFILES[profile] if isinstance(profile, str) else profile
        if sim_env is not None:
            d.sim_env = dict(sim_env)
        spec = self._spec_file(d)
        if d.proc is None or d.proc.poll() is not None:
            return  # applied at the next start
        subprocess.run(["nsenter", "--target", str(d.proc.pid), "--mount", "--",
                        self.python, str(self._apply_script), str(spec)], check=True, capture_output=True)

    def rotate_host_key(self, name: str) -> None:
        """A reflashed device: new host key, same port (restarts its sshd)."""
        d = self.devices[name]
        running = d.proc is not None
        self.stop_device(name)
        key = d.dir / "ssh_host_ed25519_key"
        for p in (key, key.with_suffix(".pub")):
            p.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"kiln-sim-{name}", "-f", str(key)],
                       check=True, capture_output=True)
        d.host_key_pub = " ".join((d.dir / "ssh_host_ed25519_key.pub").read_text().split()[0:2])
        if running:
            self.start_device(name)

    # -- what clients need -----------------------------------------------------------

    def port(self, name: str) -> int:
        return self.devices[name].port

    def known_hosts_line(self, name: str, *, key_of: str | None = None) -> str:
        """`[127.0.0.1]:PORT <key>` for `name` (with the key of device `key_of`, to fake a changed key)."""
        key = self.devices[key_of or name].host_key_pub
        return f"[127.0.0.1]:{self.devices[name].port} {key}\n"

    def known_hosts(self, names=None) -> str:
        return "".join(self.known_hosts_line(n) for n in (self.devices if names is None else names))

    def write_known_hosts(self, path: Path | str, names=None, extra: str = "") -> Path:
        path = Path(path)
        path.write_text(self.known_hosts(names) + extra)
        return path

    def ssh_config_text(self, known_hosts: Path | str | None = None) -> str:
        kh = known_hosts or self.known_hosts_path
        out = []
        for d in self.devices.values():
            out.append(f"Host {d.name}\n  HostName 127.0.0.1\n  Port {d.port}\n  User root\n"
                       f"  IdentityFile {self.client_key}\n  IdentitiesOnly yes\n"
                       f"  UserKnownHostsFile {kh}\n  GlobalKnownHostsFile /dev/null\n"
                       + (f"  ProxyJump {d.via}\n" if d.via else "") + "\n")
        return "".join(out)

    def write_ssh_config(self, path: Path | str | None = None, known_hosts: Path | str | None = None) -> Path:
        path = Path(path or self.ssh_config_path)
        path.write_text(self.ssh_config_text(known_hosts))
        return path

    def transport(self, name: str, **options):
        """An SSHTransport to device `name` through this fleet's ssh_config (no I/O until used)."""
        from kiln.transports.ssh import SSHTransport
        options.setdefault("ssh_config", self.ssh_config_path)
        options.setdefault("connect_timeout", 5.0)
        return SSHTransport(name, name, **options)

    # -- device-side observations -------------------------------------------------

    def log_text(self, name: str) -> str:
        d = self.devices[name]
        return d.log.read_text(errors="replace") if d.log.exists() else ""

    def logins(self, name: str) -> int:
        """Authenticated SSH connections the device accepted (sshd VERBOSE log)."""
        return self.log_text(name).count("Accepted publickey for ")

    def tcp_connections(self, name: str) -> int:
        """TCP connections the device's sshd saw (authenticated or not)."""
        return self.log_text(name).count("Connection from ")

    def wait_logins(self, name: str, at_least: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while (n := self.logins(name)) < at_least and time.monotonic() < deadline:
            time.sleep(0.02)
        return n

    def builds(self, name: str) -> list:
        """Builds trtexec_sim.py recorded on the device (builds.log: one JSON object per line)."""
        return self._state_log(name, "builds.log")

    def refits(self, name: str) -> list:
        """Engine refits the simulated TensorRT Python API recorded on the device (refits.log;
        tests/fleet/trt_python/refit.py): never counted as builds."""
        return self._state_log(name, "refits.log")

    def loads(self, name: str) -> list:
        """Engine loads trtexec_sim.py recorded on the device (loads.log)."""
        return self._state_log(name, "loads.log")

    def calibrations(self, name: str) -> list:
        """INT8 calibrations the simulated TensorRT Python API ran on the device (calibrations.log)."""
        return self._state_log(name, "calibrations.log")

    def trt_invocations(self, name: str) -> list:
        """Every start on the device of something that loads TensorRT (and CUDA) on a real one:
        each trtexec run, --help included, and each import of the `tensorrt` python package
        (trt_invocations.log: {"tool": "trtexec"|"python", "argv": ...})."""
        return self._state_log(name, "trt_invocations.log")

    def _state_log(self, name: str, file: str) -> list:
        path = self.devices[name].state / file
        out = []
        for line in (path.read_text().splitlines() if path.exists() else []):
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append(line)
        return out

    def srv(self, name: str) -> Path:
        """The device's /srv, seen from the host."""
        return self.devices[name].dir / "srv"

    def state_dir(self, name: str) -> Path:
        """KILN_SIM_STATE of the device (trtexec_sim.py writes builds.log there)."""
        return self.devices[name].state

    def processes(self, name: str) -> list[int]:
        """Pids running in the device's namespace (sshd, sessions, commands)."""
        d = self.devices[name]
        return _pids_in_ns(d.ns) if d.ns else []


#: the standard fleet the session fixture starts: name -> (profile, via)
STANDARD_DEVICES: dict[str, tuple[str, str | None]] = {
    "orin-01": ("orin-jp5", None),
    "orin-02": ("orin-jp5", None),
    "orin-jp6": ("orin-jp6", None),
    "xavier-01": ("xavier-jp5", None),
    "cpu-01": ("cpu", None),
    "bastion": ("cpu", None),
    "hidden-orin": ("orin-jp5", "bastion"),
}


def standard_fleet(root: Path | str, **kwargs) -> Fleet:
    fleet = Fleet(root, **kwargs)
    for name, (profile, via) in STANDARD_DEVICES.items():
        fleet.add_device(name, profile, via=via)
    return fleet
