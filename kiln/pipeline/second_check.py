"""`verify_on = 2`: a new engine is loaded and checked against the reference on a second member of
its class before it is published. It catches a builder that builds wrong engines (bad hardware,
a broken TensorRT install) and an engine that only works where it was built.
"""
from __future__ import annotations

from pathlib import Path

from kiln.config import Target
from kiln.devices.workarea import Device
from kiln.errors import BuildError, UnreachableError
from kiln.pipeline.context import Context
from kiln.pipeline.fingerprints import recorded_classes
from kiln.stores.base import reference_entry


def second_members(ctx: Context, spec, builder: Target) -> list[Target]:
    """The class's other members (by recorded fingerprints), designated builders first."""
    classes = recorded_classes(ctx)
    others = [t for t in ctx.fleet.targets.values()
              if t.name != builder.name and t.name in classes and classes[t.name].id == spec.hwclass.id]
    return sorted(others, key=lambda t: not t.builder)


def verify_on_second_member(ctx: Context, spec, builder: Device, engine: str, engine_sha: str,
                            onnx_record: dict, ref_local: Path, still_in_class, say) -> dict:
    """Copy the engine the builder made to another member and verify it there; returns that
    member's report. Raises BuildError when no other member can check it: the setting asks for
    two, so one is not enough."""
    backend, tried = spec.backend, []
    local = ctx.engine_cache(engine_sha)
    if builder.transport.get(engine, local) != engine_sha:
        raise BuildError(f"the engine fetched from {builder.target} does not match the sha256 it reported",
                         target=builder.target, hint="retry; if it persists check the device's storage")
    for target in second_members(ctx, spec, builder.config):
        if not still_in_class(ctx, spec, target):
            tried.append(f"{target.name}: no longer in the class")
            continue
        other = Device(ctx.transport(target), target)
        try:
            remote = other.ensure_input(local, engine_sha, "." + backend.engine_file)
            ref = other.ensure_input(ref_local, onnx_record["reference_sha256"], ".npz", store=ctx.store,
                                     entry=reference_entry(onnx_record["onnx_sha256"]))
        except UnreachableError as exc:
            tried.append(f"{target.name}: {exc.message}")
            continue
        say(f"  verify_on = 2: checking engine {engine_sha[:12]} on {target.name} too")
        from kiln.pipeline.engines import engine_verify   # engines imports this module
        report = backend.verify(other, remote, ref, engine_verify(spec.model), backend.build_settings(spec.model.build),
                                reference_local=ref_local)
        return {**report, "target": target.name}
    raise BuildError(f"verify_on = 2: no second member of class {spec.hwclass.id} could check the engine built on "
                     f"{builder.target}" + (f" ({'; '.join(tried)})" if tried else " (the class has no other recorded member)"),
                     model=spec.model.name, hint="bring another member of the class online (and `doit fingerprint` "
                                                 "it), or set verify_on = 1 for this model")
