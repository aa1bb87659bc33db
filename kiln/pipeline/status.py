"""`doit status`: what each device actually runs, against what it should run.

One command per device, all devices at once (Device.release_states: `current`, `previous`,
the hold and the active manifest); `offline` uses this controller's records instead and
says so. Per (target, model) a row with one `state`:

  up to date            the wanted release is active
  pending               a newer engine is waiting to be deployed (or nothing was deployed yet)
  drift                 pending because the device changed (the changed fields are listed)
  rolled back           held on a release by `doit rollback:<target>`
  pinned                held on a release by `pin` in the fleet file
  differs from wanted   the device runs something no deploy of this controller activated
                        (switched by hand, or by another controller)
  removed               the model left the target's list but is still active on the device
  unreachable           the device did not answer (offline: never probed)
  unknown               no fingerprint or no export yet: nothing can be wanted
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from kiln.config import Target
from kiln.devices.hwclass import class_or_none, describe_change
from kiln.devices.workarea import Device, ReleaseState
from kiln.errors import ExportError, KilnError
from kiln.keys import digest, read_json
from kiln.pipeline.calibration import calibration_digest
from kiln.pipeline.context import MAX_PARALLEL, Context
from kiln.pipeline.engines import EngineSpec, engine_key_inputs
from kiln.pipeline.export import ExportPaths, export_inputs
from kiln.pipeline.busy import last_busy
from kiln.pipeline.releases import plan_release

log = logging.getLogger(__name__)

STATES = ("up to date", "pending", "drift", "rolled back", "pinned", "differs from wanted", "removed",
          "unreachable", "unknown")


def read_devices(ctx: Context, targets: list[Target]) -> dict[str, tuple[dict, dict] | KilnError]:
    """Every target's releases, asked in parallel; an unreachable device maps to its error."""
    def one(target: Target):
        try:
            return Device(ctx.transport(target), target).release_states(target.models)
        except KilnError as exc:
            return exc
    if not targets:
        return {}
    with ThreadPoolExecutor(min(MAX_PARALLEL, len(targets)), thread_name_prefix="kiln-status") as pool:
        return dict(zip((t.name for t in targets), pool.map(one, targets)))


def _offline_states(ctx: Context, target: Target) -> tuple[dict, dict]:
    """What this controller last activated: the best guess without asking the device."""
    record = (read_json(ctx.deployment_record(target.name)) or {}).get("releases", {})
    return {m: ReleaseState(m, current=record.get(m)) for m in target.models}, {}


def fleet_status(ctx: Context, offline: bool = False) -> list[dict]:
    """One row per (target, model), plus one per model still active on a device that left its list."""
    targets = list(ctx.fleet.targets.values())
    live = {} if offline else read_devices(ctx, targets)
    rows = []
    for target in targets:
        answer = _offline_states(ctx, target) if offline else live[target.name]
        rows += _target_rows(ctx, target, answer, offline)
    return rows


def _target_rows(ctx: Context, target: Target, answer, offline: bool) -> list[dict]:
    fingerprint = read_json(ctx.fingerprint_file(target.name))
    previous_fp = read_json(ctx.previous_fingerprint_file(target.name))
    probe_error = read_json(ctx.probe_error_file(target.name))
    confirmed = (read_json(ctx.deployment_record(target.name)) or {}).get("releases", {})
    hw = class_or_none(target, fingerprint) if fingerprint else None
    drift = describe_change(previous_fp, fingerprint, target.backend, tuple(target.class_fields)) \
        if previous_fp and fingerprint else []
    busy = last_busy(ctx, target)
    unreachable = answer if isinstance(answer, KilnError) else None
    states, others = ({}, {}) if unreachable else answer
    rows = []
    for model_name in target.models:
        model = ctx.fleet.model_for(target, model_name)   # with the target's build overrides
        why: list[str] = []
        if probe_error:
            why.append(f"last probe failed: {probe_error.get('error')}")
        wanted = _wanted_key(ctx, target, model, hw, fingerprint, why)
        state = states.get(model_name) or ReleaseState(model_name)
        row = {"target": target.name, "model": model_name, "class": hw.id if hw else None, "wanted": wanted,
               "active": state.current, "previous": state.previous, "pinned": None, "held": None,
               "deployed_at": state.deployed_at, "latency_ms": state.latency_ms, "drift": drift,
               "profile": _profile(ctx, model.engine_name, hw, wanted),
               "source": "records" if offline else "device"}
        if model.variant:  # the target's build overrides (kiln.config.Fleet.model_for)
            row["variant"] = model.variant
        if unreachable:
            row.update(active=confirmed.get(model_name), state="unreachable",
                       why=why + [f"device did not answer: {unreachable.message}"])
            rows.append(row)
            continue
        try:
            plan = plan_release(target, model_name, wanted, state)
        except KilnError as exc:
            row.update(state="pinned", pinned=target.settings["pin"][model_name], why=why + [exc.message])
            rows.append(row)
            continue
        row.update(_state(target, plan, state, confirmed.get(model_name), drift, offline, why))
        if busy and row["state"] != "up to date":
            row["busy"] = busy
            row["why"].append(f"the last deploy found the device busy at {busy.get('since')} "
                              f"({busy.get('why')}) and switched nothing")
        rows.append(row)
    for model_name, key in sorted(others.items()):
        rows.append({"target": target.name, "model": model_name, "class": hw.id if hw else None, "wanted": None,
                     "active": key, "previous": None, "pinned": None, "held": None, "deployed_at": None,
                     "latency_ms": None, "drift": [], "source": "device", "state": "removed",
                     "why": [f"no longer in targets.{target.name}.models; the next deploy deactivates it"]})
    return rows


def _wanted_key(ctx: Context, target: Target, model, hw, fingerprint, why: list[str]) -> str | None:
    paths = ExportPaths.for_model(ctx.artifacts, model.name)
    onnx, provenance = read_json(paths.record), read_json(paths.provenance)
    try:
        if provenance is None or digest(export_inputs(model, ctx.hashes, provenance)) != provenance["export_key"]:
            why.append("export is stale (checkpoint, model code or options changed)")
    except ExportError as exc:
        why.append(exc.message)
    if fingerprint is None:
        why.append("never probed")
    if onnx is None:
        why.append("never exported")
    if not (hw and onnx):
        return None
    spec = EngineSpec(model, hw, fingerprint, (target,), calibration_digest(ctx.hashes, model, hw.backend))
    key = digest(engine_key_inputs(spec, onnx))
    record = read_json(ctx.engine_record(model.engine_name, hw.id))
    if record is None or record["key"] != key:
        why.append(f"engine for class {hw.id} not built yet")
    return key


def _profile(ctx: Context, model: str, hw, key: str | None) -> dict | None:
    """The wanted engine's measured cost on this class (kiln.pipeline.engines.engine_profile)."""
    record = read_json(ctx.engine_record(model, hw.id)) if hw and key else None
    return record.get("profile") if record and record.get("key") == key else None


def _state(target: Target, plan, state: ReleaseState, confirmed: str | None, drift: list[str],
           offline: bool, why: list[str]) -> dict:
    active, out = state.current, {}
    if plan.source == "pin":
        out.update(state="pinned", pinned=target.settings["pin"][plan.model], wanted_release=plan.key)
        if active != plan.key:
            why.append(f"pinned release {plan.key[:12]} is not active yet: deploy to switch")
        why.append(plan.why)
    elif plan.source == "hold":
        out.update(state="rolled back", held=plan.key, wanted_release=plan.key)
        if active != plan.key:
            why.append(f"held release {str(plan.key)[:12]} is not active: someone switched it by hand")
        why.append(plan.why)
    elif plan.key is None:
        out["state"] = "unknown"
    elif active == plan.key:
        out["state"] = "up to date"
        if state.hold:
            why.append("the rollback's hold ends with the next deploy (the wanted engine changed)")
    elif active is None:
        out["state"] = "pending"
        why.append("never deployed")
    elif not offline and active != confirmed and confirmed is not None:
        out["state"] = "differs from wanted"
        why.append(f"the device runs {active[:12]}, which this controller did not activate "
                   f"(it activated {confirmed[:12]}); the next deploy switches to {plan.key[:12]}")
    else:
        out["state"] = "drift" if drift else "pending"
        why.append("a newer engine is waiting to be deployed"
                   + (f" (the device changed: {'; '.join(drift)})" if drift else ""))
        if state.hold:
            why.append("the rollback's hold ended: the wanted engine changed since")
    out.setdefault("wanted_release", plan.key)
    out["why"] = why or ["up to date"]
    return out


def format_status(rows: list[dict]) -> str:
    """Aligned plain text (logs, pipes)."""
    head = ("target", "model", "class", "wanted", "active", "previous", "state", "deployed", "smoke ms")
    table = [head] + [(r["target"], r["model"], r["class"] or "-", _short(r["wanted"]),
                       _short(r["active"]), _short(r["previous"]), r["state"], (r["deployed_at"] or "-")[:16].replace("T", " "),
                       f"{r['latency_ms']:.1f}" if r["latency_ms"] is not None else "-") for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    lines = []
    for i, row in enumerate(table):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i and (notes := _notes(rows[i - 1])):
            lines.append(" " * (widths[0] + 2) + notes)
    return "\n".join(lines)


def _notes(row: dict) -> str:
    parts = [w for w in row["why"] if w != "up to date"]
    if row["drift"]:  # the last change of the device's class, kept until the next one
        parts.append("device changed: " + "; ".join(row["drift"]))
    return "; ".join(parts)


def _short(key: str | None) -> str:
    return key[:12] if key else "-"


STATE_STYLE = {"up to date": "green", "pending": "yellow", "drift": "yellow", "rolled back": "magenta",
               "pinned": "magenta", "differs from wanted": "red", "removed": "red", "unreachable": "red bold",
               "unknown": "dim"}


def print_status_table(rows: list[dict], file, width: int | None = None) -> None:
    """A rich table, for a terminal: names, keys and states never wrap; the class is shortened
    and the reasons wrap when the terminal is narrow."""
    from rich.console import Console
    from rich.table import Table
    table = Table(show_lines=False, header_style="bold")
    for col in ("target", "model", "class", "wanted", "active", "previous", "state", "deployed", "smoke ms", "why"):
        if col == "why":
            table.add_column(col, overflow="fold", min_width=20)
        elif col == "class":
            table.add_column(col, overflow="ellipsis", no_wrap=True, max_width=28)
        else:
            table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(r["target"], r["model"], r["class"] or "-", _short(r["wanted"]),
                      _short(r["active"]), _short(r["previous"]),
                      f"[{STATE_STYLE.get(r['state'], '')}]{r['state']}[/]", (r["deployed_at"] or "-")[:16].replace("T", " "),
                      f"{r['latency_ms']:.1f}" if r["latency_ms"] is not None else "-", _notes(r))
    Console(file=file, width=width).print(table)
