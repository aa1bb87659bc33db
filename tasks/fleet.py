"""engine:<model>@<class> and deploy:<target>, created once the targets are probed.

Classes are known only after probing, so these tasks come from one delayed
creator. A target whose probe failed this run gets a deploy task that fails with
the probe's reason: it fails alone, the rest of the fleet goes on.
"""
from __future__ import annotations

from doit import create_after

from kiln.config import Target
from kiln.pipeline.deploy import deploy_target
from kiln.pipeline.engines import EngineSpec, current_engine_key, ensure_engine
from kiln.errors import DeployError, KilnError
from kiln.devices.hwclass import HardwareClass, hardware_class
from kiln.keys import read_json

from .common import CTX, action, say
from .fingerprint import PROBES


def fleet_classes() -> tuple[dict[str, HardwareClass], list[str]]:
    """Class of each probed target, and the targets whose probe failed."""
    classes, unprobed = {}, []
    for target in CTX.fleet.targets.values():
        fingerprint = read_json(CTX.fingerprint_file(target.name))
        if fingerprint is None or CTX.probe_error_file(target.name).exists():
            unprobed.append(target.name)
            continue
        classes[target.name] = hardware_class(target.backend, fingerprint, tuple(target.class_fields))
    return classes, unprobed


def engine_specs(classes: dict[str, HardwareClass]) -> dict[tuple[str, str], EngineSpec]:
    """One spec per (model, class), listing the class members that want the model."""
    specs: dict[tuple[str, str], EngineSpec] = {}
    for target in CTX.fleet.targets.values():
        if target.name not in classes:
            continue
        hw = classes[target.name]
        for model in target.models:
            key = (model, hw.id)
            members = specs[key].members + (target,) if key in specs else (target,)
            specs[key] = EngineSpec(CTX.fleet.models[model], hw, members)
    return specs


class EngineCheck:
    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec

    def __call__(self, task, values) -> bool:
        record = read_json(CTX.engine_record(self.spec.model.name, self.spec.hwclass.id))
        key = current_engine_key(CTX, self.spec)
        if record is not None and key is not None and record["key"] == key:
            CTX.events.emit(f"engine:{self.spec.task_name}", "skip", key=key,
                            why="ONNX, hardware class, build settings and builder unchanged")
            return True
        return False


class DeployCheck:
    """Up to date iff the recorded deployment matches the engines and the device agrees."""

    def __init__(self, target: Target, specs: list[EngineSpec]) -> None:
        self.target, self.specs = target, specs

    def wanted(self) -> dict[str, dict]:
        records = {}
        for spec in self.specs:
            record = read_json(CTX.engine_record(spec.model.name, spec.hwclass.id))
            if record is None:
                raise DeployError(f"no engine for {spec.model.name} on {self.target.name}",
                                  target=self.target.name, hint=f"run `doit engine:{spec.task_name}`")
            records[spec.model.name] = record
        return records

    def __call__(self, task, values) -> bool:
        try:
            wanted = {m: r["key"] for m, r in self.wanted().items()}
        except KilnError:
            return False
        deployed = read_json(CTX.deployment_record(self.target.name)) or {}
        if deployed.get("releases") != wanted:
            return False
        active = PROBES.probes[self.target.name].active  # read with the probe, on the same connection
        if active is None:
            from kiln.devices.workarea import Device
            try:
                active = Device(CTX.transport(self.target), self.target).active_releases(self.target.models)
            except KilnError:
                return False
        if active != wanted:
            return False
        CTX.events.emit(f"deploy:{self.target.name}", "skip", target=self.target.name,
                        why="the wanted releases are active")
        return True


def _deploy(check: DeployCheck) -> dict:
    result = deploy_target(CTX, check.target, check.wanted(), say=say)
    if not result["changed"]:
        say(f"  {check.target.name}: releases already active")
    return {"releases": result["releases"]}


def _unprobed(target: str) -> None:
    error = read_json(CTX.probe_error_file(target)) or {}
    raise DeployError(f"cannot deploy to {target}: its probe failed: {error.get('error', 'never probed')}",
                      target=target, hint=f"run `doit fingerprint:{target}` once the device is reachable")


@create_after(executed="fingerprint", creates=["engine", "deploy"])
def task_fleet():
    """Engines per (model, hardware class) and deploys per target, after probing."""
    classes, unprobed = fleet_classes()
    specs = engine_specs(classes)
    for spec in specs.values():
        members = ", ".join(t.name for t in spec.members)
        yield {"basename": "engine", "name": spec.task_name,
               "doc": f"engine for {spec.model.name} on class {spec.hwclass.id} ({members})",
               "actions": [action(lambda s=spec: {"key": ensure_engine(CTX, s, say=say)["key"]})],
               "uptodate": [EngineCheck(spec)],
               "task_dep": [f"export:{spec.model.name}"], "verbosity": 2}
    groups: dict[str, list[str]] = {}
    for target in CTX.fleet.targets.values():
        for g in target.groups:
            groups.setdefault(g, []).append(f"deploy:{target.name}")
        if target.name in unprobed:
            yield {"basename": "deploy", "name": target.name, "doc": f"deploy to {target.name} (probe failed)",
                   "actions": [action(lambda t=target.name: _unprobed(t))],
                   "task_dep": [f"fingerprint:{target.name}"], "verbosity": 2}
            continue
        mine = [specs[(m, classes[target.name].id)] for m in target.models]
        yield {"basename": "deploy", "name": target.name,
               "doc": f"deploy {', '.join(target.models)} to {target.name}",
               "actions": [action(lambda c=DeployCheck(target, mine): _deploy(c))],
               "uptodate": [DeployCheck(target, mine)],
               "task_dep": [f"engine:{s.task_name}" for s in mine] + [f"fingerprint:{target.name}"],
               "verbosity": 2}
    for group, members in sorted(groups.items()):
        yield {"basename": "deploy", "name": group, "doc": f"deploy the group {group}",
               "actions": None, "task_dep": members}
