"""cache-check: what the store holds for the fleet, without touching a device (status: kiln.pipeline.status).

Fingerprints and ONNX records are read from artifacts/ when present, else from
the store, so a CI worker with an empty checkout can ask "is every engine built?".
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

from kiln.pipeline.calibration import calibration_digest
from kiln.pipeline.context import Context
from kiln.pipeline.engines import EngineSpec, engine_key_inputs, engine_profile
from kiln.errors import StoreError
from kiln.pipeline.export import ExportPaths
from kiln.pipeline.status import fleet_status, format_status  # noqa: F401 - `status` lives there
from kiln.devices.hwclass import class_or_none
from kiln.keys import digest, read_json
from kiln.signing import controller_trust
from kiln.stores.base import blob_entry, engine_entry, engine_manifest_entry, fingerprint_entry, onnx_record_entry

log = logging.getLogger(__name__)


@dataclass
class CacheRow:
    model: str
    hardware_class: str | None
    status: str            # hit | miss | unknown
    key: str | None
    targets: list[str] = field(default_factory=list)
    why: str = ""
    profile: dict | None = None   # the engine's measured cost on its class (kiln.pipeline.engines.engine_profile)


def _from_store(ctx: Context, name: str) -> dict | None:
    try:
        return json.loads(ctx.store.get_bytes(name))
    except (KeyError, ValueError):
        return None
    except StoreError as exc:  # e.g. corrupt, and not removable with read-only CI credentials
        log.warning("cannot read %s from the store: %s", name, exc.message)
        return None


def recorded_fingerprint(ctx: Context, target: str) -> dict | None:
    return read_json(ctx.fingerprint_file(target)) or _from_store(ctx, fingerprint_entry(target))


def recorded_onnx(ctx: Context, model: str) -> dict | None:
    return read_json(ExportPaths.for_model(ctx.artifacts, model).record) or _from_store(ctx, onnx_record_entry(model))


def cache_report(ctx: Context) -> list[CacheRow]:
    """Per (model, class): hit or miss. Raises StoreError when the store cannot be asked at all
    (missing bucket, wrong endpoint, rejected credentials): an outage is not a miss."""
    ctx.store  # opened and checked once: one request
    rows: dict[tuple[str, str], CacheRow] = {}
    unknown: list[CacheRow] = []
    onnx_records: dict[str, dict | None] = {}
    for target in ctx.fleet.targets.values():
        fingerprint = recorded_fingerprint(ctx, target.name)
        for model_name in target.models:
            if model_name not in onnx_records:
                onnx_records[model_name] = recorded_onnx(ctx, model_name)
            onnx = onnx_records[model_name]
            if fingerprint is None or onnx is None:
                missing = "no recorded fingerprint" if fingerprint is None else "model never exported"
                unknown.append(CacheRow(model_name, None, "unknown", None, [target.name], missing))
                continue
            hw = class_or_none(target, fingerprint)
            if hw is None:
                unknown.append(CacheRow(model_name, None, "unknown", None, [target.name],
                                        "recorded fingerprint forms no hardware class"))
                continue
            model = ctx.fleet.model_for(target, model_name)   # with the target's build overrides
            row = rows.get((model.engine_name, hw.id))
            if row is None:
                spec = EngineSpec(model, hw, fingerprint, (target,), calibration_digest(ctx.hashes, model, hw.backend))
                key = digest(engine_key_inputs(spec, onnx))
                hit, why, manifest = _lookup(ctx, key)
                row = rows[(model.engine_name, hw.id)] = CacheRow(   # `det`, or `det~<variant>`
                    model.engine_name, hw.id, "hit" if hit else "miss", key, [],
                    why or f"no engine for ONNX {onnx['onnx_sha256'][:12]} on this class",
                    engine_profile(manifest) if hit else None)
            row.targets.append(target.name)
    return sorted(rows.values(), key=lambda r: (r.model, r.hardware_class)) + unknown


def engine_in_store(ctx: Context, key: str) -> bool:
    return engine_in_store_why(ctx, key)[0]


def engine_in_store_why(ctx: Context, key: str) -> tuple[bool, str]:
    """(hit, why): see _lookup."""
    return _lookup(ctx, key)[:2]


def _lookup(ctx: Context, key: str) -> tuple[bool, str, dict | None]:
    """(hit, why, the manifest of a hit). A hit iff the key's manifest exists and names that key, a trusted key signed it (kiln.signing: the
    [signing] trusted ids and this controller's own key, if it has one) and the blob it names
    exists (records only, no payload; writes nothing, so read-only CI credentials do: an
    untrusted manifest is reported, not quarantined). Stores written before blobs/ kept the
    bytes under the key: those count when their record matches the manifest. `why` is "" for a
    plain miss (no manifest, or no blob)."""
    manifest = _from_store(ctx, engine_manifest_entry(key))
    sha = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(sha, str):
        return False, "", None
    if manifest.get("key") != key:  # copied from another engine's place (kiln.pipeline.engines._read_manifest)
        return False, f"misplaced: the manifest stored for this key names engine {str(manifest.get('key'))[:12]}", None
    verdict = controller_trust(ctx).verdict(manifest)
    if not verdict.ok:
        label = "unsigned" if verdict.status == "unsigned" else "untrusted"
        return False, f"{label}: the engine in the store is not signed by a trusted key ({verdict.describe()})", None
    for name in (blob_entry(sha), engine_entry(key)):
        info = ctx.store.info(name)
        if info is not None and info.sha256 == sha:
            return True, "engine in the store", manifest
    return False, "", None


def cache_ok(rows: list[CacheRow]) -> bool:
    return bool(rows) and all(r.status == "hit" for r in rows)


def format_cache_table(rows: list[CacheRow]) -> str:
    lines = [f"{'status':7} {'model':20} {'hardware class':42} {'engine key':14} targets"]
    for r in rows:
        lines.append(f"{r.status:7} {r.model:20} {(r.hardware_class or '-'):42} {(r.key or '-')[:12]:14} "
                     f"{', '.join(r.targets)}" + (f"  ({r.why})" if r.status != "hit" else ""))
    hits = sum(r.status == "hit" for r in rows)
    lines.append(f"{hits}/{len(rows)} engines present" + ("" if cache_ok(rows) else " — cache-check FAILS"))
    return "\n".join(lines)


def cache_json(rows: list[CacheRow], store_url: str) -> str:
    return json.dumps({"ok": cache_ok(rows), "store": store_url, "engines": [asdict(r) for r in rows]},
                      indent=2, sort_keys=True)


def cache_junit(rows: list[CacheRow]) -> str:
    """One testcase per (model, hardware class): Jenkins and GitHub Actions read this."""
    from xml.sax.saxutils import quoteattr  # here: it pulls in urllib, http and ssl
    failures = sum(r.status != "hit" for r in rows)
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           f'<testsuite name="enginekiln.cache-check" tests="{len(rows)}" failures="{failures}" errors="0">']
    for r in rows:
        name = quoteattr(f"{r.model}@{r.hardware_class or 'unknown'}")
        out.append(f'  <testcase classname="enginekiln.cache" name={name}>')
        if r.status != "hit":
            msg = quoteattr(f"{r.status}: {r.why}; targets: {', '.join(r.targets)}")
            out.append(f"    <failure message={msg}/>")
        out.append("  </testcase>")
    out.append("</testsuite>")
    return "\n".join(out) + "\n"

