"""The one /proc/cpuinfo parser and the one CPU ISA flag set (docs/devices.md §6).

Both the in-process local probe and the shell probe run over a transport feed
their /proc/cpuinfo text through `parse_cpuinfo`, so one machine probed either
way gets the same `cpu_model` / `cpu_flags` and hence the same ONNX Runtime
hardware class. Only the first processor block is read (the shell probe sends
just that block): per-core differences (big.LITTLE) and the ARM trailer lines
(`Hardware`, `Serial`) are not part of it.
"""
from __future__ import annotations

__all__ = ["ISA_FLAGS", "ISA_PREFIXES", "isa_flags", "first_processor", "parse_cpuinfo"]

#: CPU flags that change which kernels a CPU runtime (ONNX Runtime's MLAS, its
#: optimised graphs) may use; x86 and ARM spellings as the kernel prints them.
ISA_FLAGS = frozenset("""
sse sse2 sse3 pni ssse3 sse4_1 sse4_2 sse4a avx avx2 fma fma4 f16c bmi1 bmi2 popcnt movbe aes
pclmulqdq sha_ni vaes vpclmulqdq gfni avx_vnni avx_vnni_int8 avx_ifma avx_ne_convert
avx512f avx512cd avx512bw avx512dq avx512vl avx512ifma avx512vbmi avx512_vbmi2 avx512_vnni
avx512_bitalg avx512_vpopcntdq avx512_bf16 avx512_fp16 avx512_vp2intersect
amx_tile amx_int8 amx_bf16 amx_fp16 amx_complex
fp asimd neon asimdhp asimddp asimdfhm asimdrdm fphp sve sve2 i8mm bf16 svei8mm svebf16 sme sme2
atomics
""".split())

#: Families whose future members are ISA-relevant too (a new kernel names them first).
#: Not "sme": x86's `smep` (a supervisor-mode protection flag) would match it.
ISA_PREFIXES = ("avx512", "amx_", "sve")


def isa_flags(flags) -> list[str]:
    """The ISA-relevant subset of a flag list, sorted and de-duplicated."""
    return sorted({f for f in flags if f in ISA_FLAGS or f.startswith(ISA_PREFIXES)})


def first_processor(text: str) -> dict[str, str]:
    """`key: value` pairs of the first processor block (keys lower-cased, first one wins)."""
    info: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            info.setdefault(key.strip().lower(), value.strip())
    return info


def parse_cpuinfo(text: str) -> dict[str, object]:
    """CPU model and ISA flags of the first processor in /proc/cpuinfo (x86 or ARM).

    cpu_model: x86 `model name`; else `cpu model` (MIPS and friends); else, on ARM
    (whose cpuinfo has no model name), "ARM implementer <0xNN> part <0xNNN>".
    cpu_flags: x86 `flags` / ARM `Features`, reduced to ISA_FLAGS, as a sorted list
    ([] when unknown).
    """
    info = first_processor(text)
    model = info.get("model name") or info.get("cpu model") or None
    if not model and "cpu implementer" in info:
        model = f"ARM implementer {info['cpu implementer']} part {info.get('cpu part', '?')}"
    flags = (info.get("flags") or info.get("features") or "").split()
    return {"cpu_model": model, "cpu_flags": isa_flags(flags)}
