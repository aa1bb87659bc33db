"""`doit report`: one self-contained static HTML page about the fleet.

Two halves:
- `gather_report(ctx, live=False)` reads what the page shows: the status rows
  (`fleet_status`, records only unless `live`), the hardware classes of the recorded
  fingerprints, the engine records, the tail of the event log and the task graph.
  It writes nothing and, unless `live`, contacts no device.
- `render_report(data)` is pure: that dict in, an HTML string out. Inline CSS, inline
  SVG, a few lines of inline JS (table filter, edge highlight), no external resource.
  Everything that comes from the fleet file, a device or the event log is escaped.

The task graph is laid out here (`layout_graph`: layers by longest path, sources pulled
next to their first consumer, barycenter ordering, spacing by a relaxation pass), so no
graphviz is needed; a fleet of ~50 targets gives a tall graph that scrolls in its box.
"""
from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: events shown (the newest first)
EVENT_TAIL = 200
#: bytes read from the end of events.jsonl (the log grows forever; the page wants its tail)
EVENT_TAIL_BYTES = 512 * 1024
#: graph label length before it is cut (the full name is in the node's tooltip)
LABEL_CHARS = 52


# -- gathering (reads records; devices only with live=True) -----------------------------------

def gather_report(ctx, live: bool = False) -> dict:
    """Everything the page shows, as plain data (see module doc)."""
    from kiln.devices.hwclass import hardware_class
    from kiln.errors import KilnError
    from kiln.keys import read_json
    from kiln.pipeline.fingerprints import recorded_classes
    from kiln.pipeline.status import fleet_status

    rows = [normalize_status_row(r) for r in fleet_status(ctx, offline=not live)]
    fleet = ctx.fleet
    classes = recorded_classes(ctx)

    by_class: dict[str, dict] = {}
    unclassified = []
    for target in fleet.targets.values():
        fingerprint = read_json(ctx.fingerprint_file(target.name))
        error = read_json(ctx.probe_error_file(target.name))
        hw = classes.get(target.name)
        if hw is None:
            if error:
                why = f"last probe failed: {error.get('error')}"
            elif fingerprint is None:
                why = f"never probed (run `doit fingerprint:{target.name}`)"
            else:
                try:
                    hardware_class(target.backend, fingerprint, tuple(target.class_fields), target=target.name)
                    why = "no class recorded"
                except KilnError as exc:
                    why = exc.message
            unclassified.append({"target": target.name, "backend": target.backend, "why": why})
            continue
        entry = by_class.setdefault(hw.id, {"id": hw.id, "backend": hw.backend, "digest": hw.digest,
                                            "fields": hw.fields, "members": []})
        others = {k: v for k, v in (fingerprint or {}).items() if k not in hw.fields}
        entry["members"].append({"target": target.name, "transport": target.transport,
                                 "builder": bool(getattr(target, "builder", False)), "other": others})

    engines = []
    for path in sorted((ctx.artifacts / "engines").glob("*.json")):
        record = read_json(path)
        if isinstance(record, dict) and record.get("model") and record.get("key"):
            engines.append(record)

    graph_nodes, graph_edges = task_graph(fleet, classes)
    return {
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "fleet_file": str(fleet.path), "artifacts": str(ctx.artifacts), "store": fleet.store_url,
        "live": live, "status": rows, "classes": list(by_class.values()), "unclassified": unclassified,
        "engines": engines, "events": tail_events(ctx.events.path),
        "graph": {"nodes": graph_nodes, "edges": graph_edges},
    }


def normalize_status_row(row: dict) -> dict:
    """One status row in the keys the page uses, from `fleet_status`'s row (older rows named the
    wanted key `engine_key` and the recorded release `deployed`, and had no state)."""
    why = [str(w) for w in (row.get("why") or [])]
    state = row.get("state") or ("up to date" if why in ([], ["up to date"]) else "outdated")
    return {"target": row.get("target"), "model": row.get("model"), "class": row.get("class"),
            "wanted": row.get("wanted", row.get("engine_key")), "active": row.get("active", row.get("deployed")),
            "previous": row.get("previous"), "state": str(state), "drift": [str(d) for d in row.get("drift") or []],
            "why": why, "pinned": row.get("pinned"), "deployed_at": row.get("deployed_at"),
            "latency_ms": row.get("latency_ms")}


def tail_events(path: Path, limit: int = EVENT_TAIL, max_bytes: int = EVENT_TAIL_BYTES) -> list[dict]:
    """The last `limit` events of events.jsonl, oldest first; reads at most `max_bytes` from its end.
    A line that is not a JSON object (cut by the read window, or damaged) is skipped."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    if size > max_bytes:
        lines = lines[1:]  # the first one is probably cut
    out = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            out.append(event)
    return out[-limit:]


def task_graph(fleet, classes: dict) -> tuple[list[dict], list[tuple[str, str]]]:
    """The doit tasks of the pipeline and their edges, from the fleet file and the recorded classes
    (the same engine tasks `doit list` shows): export:<m> -> engine:<m>@<class> -> deploy:<t> ->
    deploy:<group>, fingerprint:<t> -> deploy:<t>. A target without a recorded class has no engine
    task yet: its export feeds its deploy directly."""
    nodes: list[dict] = []
    edges: list[tuple[str, str]] = []
    used = [m for m in fleet.models]
    for m in used:
        nodes.append({"id": f"export:{m}", "kind": "export"})
    engines_seen: set[str] = set()
    for target in fleet.targets.values():
        hw = classes.get(target.name)
        for m in target.models:
            if hw is None:
                edges.append((f"export:{m}", f"deploy:{target.name}"))
                continue
            engine = f"engine:{fleet.model_for(target, m).engine_name}@{hw.id}"
            if engine not in engines_seen:
                engines_seen.add(engine)
                nodes.append({"id": engine, "kind": "engine"})
                edges.append((f"export:{m}", engine))
            edges.append((engine, f"deploy:{target.name}"))
    for target in fleet.targets.values():
        nodes.append({"id": f"fingerprint:{target.name}", "kind": "fingerprint"})
        nodes.append({"id": f"deploy:{target.name}", "kind": "deploy"})
        edges.append((f"fingerprint:{target.name}", f"deploy:{target.name}"))
    for group, members in sorted(fleet.groups().items()):
        nodes.append({"id": f"deploy:{group}", "kind": "group"})
        edges.extend((f"deploy:{m}", f"deploy:{group}") for m in members)
    return nodes, edges


# -- layout (pure) -----------------------------------------------------------------------------

NODE_H = 22          # px
ROW_H = 30           # px between node centres in a column
COL_GAP = 64         # px between columns
CHAR_W = 7.4         # px per character of the 12px monospace label
MARGIN = 16
HEADER_H = 28


@dataclass
class Placed:
    id: str
    layer: int
    x: float
    y: float          # top
    w: float
    h: float = NODE_H


def _layers(ids: list[str], edges: list[tuple[str, str]], kinds: dict[str, str]) -> dict[str, int]:
    """Columns: every node right of its predecessors, nodes of one kind in one column (all deploys
    line up, also one whose engine is not known yet), then kinds made only of sources moved right
    to just before their first consumer (fingerprints sit beside the engines, next to their deploy)."""
    preds: dict[str, list[str]] = {i: [] for i in ids}
    succs: dict[str, list[str]] = {i: [] for i in ids}
    for a, b in edges:
        succs[a].append(b)
        preds[b].append(a)
    groups: dict[str, list[str]] = {}
    for n in ids:
        groups.setdefault(kinds.get(n) or n, []).append(n)
    layer = {n: 0 for n in ids}
    for _ in range(len(ids) + 1):  # a cycle (not a doit graph) stops here rather than looping
        changed = False
        for a, b in edges:
            if layer[b] < layer[a] + 1:
                layer[b], changed = layer[a] + 1, True
        for members in groups.values():
            top = max(layer[n] for n in members)
            for n in members:
                if layer[n] != top:
                    layer[n], changed = top, True
        if not changed:
            break
    for members in groups.values():
        if all(not preds[n] for n in members) and any(succs[n] for n in members):
            right = min(min(layer[s] for s in succs[n]) for n in members if succs[n]) - 1
            for n in members:
                layer[n] = max(layer[n], right)
    return layer


def layout_graph(nodes: list[dict], edges: list[tuple[str, str]], sweeps: int = 6) -> tuple[list[Placed], float, float]:
    """Place `nodes` in columns (left to right = upstream to downstream); returns the placed
    nodes and the drawing's width and height. Within a column, nodes are ordered by the
    barycentre of their neighbours (fewer crossings), then spread so that no two overlap and
    each sits as near as it may to its neighbours."""
    ids = [n["id"] for n in nodes]
    known = set(ids)
    edges = [(a, b) for a, b in edges if a in known and b in known]
    layer = _layers(ids, edges, {n["id"]: n.get("kind", "") for n in nodes})
    depth = max(layer.values(), default=-1) + 1
    columns: list[list[str]] = [[] for _ in range(depth)]
    for n in ids:
        columns[layer[n]].append(n)
    nbrs: dict[str, list[str]] = {i: [] for i in ids}
    for a, b in edges:
        nbrs[a].append(b)
        nbrs[b].append(a)

    def rank() -> dict[str, float]:
        return {n: (i + 0.5) / len(col) for col in columns for i, n in enumerate(col)}

    # order: barycentre sweeps, left to right then right to left (stable for ties)
    for sweep in range(sweeps):
        order = range(depth) if sweep % 2 == 0 else range(depth - 1, -1, -1)
        for c in order:
            pos = rank()
            side = c - 1 if sweep % 2 == 0 else c + 1

            def bary(n: str) -> float:
                near = [pos[m] for m in nbrs[n] if layer[m] == side] or [pos[m] for m in nbrs[n]]
                return sum(near) / len(near) if near else pos[n]
            columns[c].sort(key=bary)

    # vertical positions: start evenly spaced, then relax towards the neighbours' mean
    y = {n: i * ROW_H for col in columns for i, n in enumerate(col)}
    for sweep in range(sweeps):
        order = list(range(depth)) if sweep % 2 == 0 else list(range(depth - 1, -1, -1))
        for c in order:
            col = columns[c]
            want = [(sum(y[m] for m in nbrs[n]) / len(nbrs[n])) if nbrs[n] else y[n] for n in col]
            placed = _spread(want)
            for n, v in zip(col, placed):
                y[n] = v
    low = min(y.values(), default=0)

    widths = [max((min(len(n), LABEL_CHARS) * CHAR_W + 16 for n in col), default=0) for col in columns]
    out, x = [], MARGIN
    for c, col in enumerate(columns):
        for n in col:
            out.append(Placed(n, c, x, y[n] - low + MARGIN + HEADER_H, widths[c]))
        x += widths[c] + COL_GAP
    width = x - COL_GAP + MARGIN if columns else 2 * MARGIN
    height = max((p.y + p.h for p in out), default=HEADER_H) + MARGIN
    return out, width, height


def _spread(want: list[float]) -> list[float]:
    """Positions in the given order, at least ROW_H apart, as near to `want` as that allows
    (forward pass pushes down, backward pass pulls up, then the block is centred on its wish)."""
    if not want:
        return []
    pos = list(want)
    for i in range(1, len(pos)):
        pos[i] = max(pos[i], pos[i - 1] + ROW_H)
    for i in range(len(pos) - 2, -1, -1):
        pos[i] = min(pos[i], pos[i + 1] - ROW_H)
    shift = sum(w - p for w, p in zip(want, pos)) / len(pos)
    return [p + shift for p in pos]


# -- rendering (pure) --------------------------------------------------------------------------

def e(value: Any) -> str:
    """HTML-escaped text (quotes too: safe in attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _short(key: str | None, n: int = 12) -> str:
    if not key:
        return '<span class="none">-</span>'
    return f'<code title="{e(key)}">{e(str(key)[:n])}</code>'


def tone(state: str | None) -> str:
    """ok | warn | bad for a state text (`doit status`: up to date; pending, drift, pinned, rolled back,
    unknown, removed; differs from wanted, unreachable)."""
    s = (state or "").lower()
    if any(w in s for w in ("unreachable", "fail", "error", "corrupt", "differs")):
        return "bad"
    if s in ("up to date", "ok", "current", "active", "hit") or s.startswith("up to date"):
        return "ok"
    return "warn"


def _fmt_value(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return "-" if value is None else str(value)


def _num(value: Any, fmt: str, unit: str = "") -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return e(format(value, fmt) + unit)
    return '<span class="none">-</span>'


def _seconds(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return '<span class="none">-</span>'
    return e(f"{value:.2f} s" if value < 10 else f"{value:.1f} s" if value < 100 else f"{value:.0f} s")


def _size(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return '<span class="none">-</span>'
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return e(f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}")
        value /= 1000
    return ""


CSS = """
:root { --ok:#1a7f37; --ok-bg:#dafbe1; --warn:#9a6700; --warn-bg:#fff8c5; --bad:#cf222e; --bad-bg:#ffebe9;
  --line:#d0d7de; --muted:#57606a; --head:#f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1f2328; }
header { background: #24292f; color: #fff; padding: 12px 20px; }
header h1 { margin: 0; font-size: 20px; }
header .meta { color: #c9d1d9; font-size: 12px; margin-top: 4px; }
header .meta code { color: #fff; }
nav { padding: 6px 20px; border-bottom: 1px solid var(--line); background: var(--head); font-size: 13px; }
nav a { margin-right: 14px; color: #0969da; text-decoration: none; }
main { padding: 0 20px 30px; }
h2 { font-size: 17px; margin: 22px 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 14px; margin: 14px 0 6px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 4px 7px; text-align: left; vertical-align: top; }
th { background: var(--head); font-weight: 600; white-space: nowrap; }
td.num { text-align: right; white-space: nowrap; }
td.wrap { overflow-wrap: anywhere; }
td.time { white-space: nowrap; }
td.task { min-width: 15em; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.none { color: #8c959f; }
.muted, .why { color: var(--muted); font-size: 12px; }
.badge { display: inline-block; padding: 0 7px; border-radius: 10px; font-size: 12px; font-weight: 600; white-space: nowrap; }
.badge.ok { color: var(--ok); background: var(--ok-bg); }
.badge.warn { color: var(--warn); background: var(--warn-bg); }
.badge.bad { color: var(--bad); background: var(--bad-bg); }
.badge.plain { color: var(--muted); background: var(--head); }
.drift { color: var(--warn); font-size: 12px; }
.summary { margin: 6px 0 10px; }
.filter { margin: 4px 0 8px; padding: 4px 8px; width: 280px; font-size: 13px; border: 1px solid var(--line); border-radius: 4px; }
.cls { border: 1px solid var(--line); border-radius: 6px; padding: 6px 12px 10px; margin: 10px 0; }
.cls dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 6px 0; font-size: 13px; }
.cls dt { color: var(--muted); }
.cls dd { margin: 0; word-break: break-word; }
details > summary { cursor: pointer; color: #0969da; font-size: 12px; }
.graph-wrap { overflow: auto; max-height: 75vh; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
svg text { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
svg .col-head { font: 600 12px system-ui, sans-serif; fill: var(--muted); }
svg .edge { fill: none; stroke: #8c959f; stroke-width: 1.2; }
svg .edge.direct { stroke-dasharray: 4 3; }
svg .edge.probe { stroke: #d0d7de; }
svg .edge.hl { stroke: #0969da; stroke-width: 2.4; }
svg .node rect { stroke-width: 1.2; rx: 4; }
svg .node.export rect { fill: #ddf4ff; stroke: #54aeff; }
svg .node.engine rect { fill: #fbefff; stroke: #c297ff; }
svg .node.fingerprint rect { fill: #f6f8fa; stroke: #8c959f; }
svg .node.deploy rect { fill: var(--ok-bg); stroke: #4ac26b; }
svg .node.group rect { fill: #fff1e5; stroke: #fb8f44; }
svg .node.warn rect { fill: var(--warn-bg); stroke: #d4a72c; }
svg .node.bad rect { fill: var(--bad-bg); stroke: #ff8182; }
svg .node:hover rect, svg .node.hl rect { stroke: #0969da; stroke-width: 2.4; }
.legend span { margin-right: 12px; font-size: 12px; }
.legend i { display: inline-block; width: 12px; height: 12px; border: 1px solid; border-radius: 3px; vertical-align: -2px; margin-right: 4px; }
"""

JS = """
document.querySelectorAll('input.filter').forEach(function (box) {
  var table = document.getElementById(box.getAttribute('data-table'));
  box.addEventListener('input', function () {
    var q = box.value.toLowerCase();
    table.querySelectorAll('tbody tr').forEach(function (tr) {
      tr.style.display = tr.textContent.toLowerCase().indexOf(q) >= 0 ? '' : 'none';
    });
  });
});
document.querySelectorAll('svg .node').forEach(function (node) {
  var id = node.getAttribute('data-task');
  function mark(on) {
    node.classList.toggle('hl', on);
    document.querySelectorAll('svg .edge').forEach(function (edge) {
      if (edge.getAttribute('data-from') === id || edge.getAttribute('data-to') === id) {
        edge.classList.toggle('hl', on);
      }
    });
  }
  node.addEventListener('mouseenter', function () { mark(true); });
  node.addEventListener('mouseleave', function () { mark(false); });
});
"""


def render_report(data: dict) -> str:
    """The page for `data` (as `gather_report` returns it)."""
    rows = data.get("status") or []
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>enginekiln fleet report</title>",
        f"<style>{CSS}</style></head><body>",
        _header(data),
        '<nav><a href="#fleet">Fleet</a><a href="#classes">Hardware classes</a><a href="#engines">Engines</a>'
        '<a href="#graph">Task graph</a><a href="#events">Events</a></nav>',
        "<main>",
        _fleet_section(rows),
        _classes_section(data.get("classes") or [], data.get("unclassified") or []),
        _engines_section(data.get("engines") or [], rows),
        _graph_section(data.get("graph") or {}, rows, data.get("unclassified") or []),
        _events_section(data.get("events") or []),
        "</main>",
        f"<script>{JS}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _header(data: dict) -> str:
    mode = ("live: active releases read from the devices" if data.get("live")
            else "records only: no device was contacted (`doit report --live` reads the devices)")
    return (f'<header><h1>enginekiln fleet report</h1><div class="meta">generated {e(data.get("generated_at"))}'
            f' &middot; fleet <code>{e(data.get("fleet_file"))}</code> &middot; artifacts '
            f'<code>{e(data.get("artifacts"))}</code> &middot; store <code>{e(data.get("store"))}</code>'
            f'<br>{e(mode)}</div></header>')


def _fleet_section(rows: list[dict]) -> str:
    targets = sorted({r["target"] for r in rows if r.get("target")})
    tones = [tone(r["state"]) for r in rows]
    counts = " &middot; ".join(f'<span class="badge {t}">{tones.count(t)} {label}</span>'
                               for t, label in (("ok", "up to date"), ("warn", "not up to date"), ("bad", "failing"))
                               if tones.count(t))
    out = ['<section id="fleet"><h2>Fleet</h2>',
           f'<div class="summary">{len(targets)} target(s), {len(rows)} deployment(s) {counts}</div>',
           '<input class="filter" type="search" placeholder="filter rows" data-table="fleet-table" '
           'aria-label="filter the fleet table">',
           '<table id="fleet-table"><thead><tr><th>target</th><th>model</th><th>hardware class</th>'
           '<th>wanted</th><th>active</th><th>previous</th><th>state</th><th>drift</th>'
           '<th>deployed</th><th>latency</th></tr></thead><tbody>']
    for r in rows:
        t = tone(r["state"])
        why = [w for w in r["why"] if w != r["state"]]
        why_html = "".join(f'<div class="why">{e(w)}</div>' for w in why) if t != "ok" else ""
        pinned = f' <span class="badge warn" title="pinned to {e(r["pinned"])}">pinned</span>' if r.get("pinned") else ""
        drift = "".join(f'<div class="drift">{e(d)}</div>' for d in r["drift"]) or '<span class="none">-</span>'
        out.append(
            f'<tr data-target="{e(r["target"])}" data-model="{e(r["model"])}" data-state="{e(t)}">'
            f'<td>{e(r["target"])}</td><td>{e(r["model"])}</td>'
            f'<td>{_code_or_dash(r.get("class"))}</td><td>{_short(r.get("wanted"))}</td>'
            f'<td>{_short(r.get("active"))}</td><td>{_short(r.get("previous"))}</td>'
            f'<td class="state"><span class="badge {t}">{e(r["state"])}</span>{pinned}{why_html}</td>'
            f'<td class="wrap">{drift}</td><td class="time">{e(r.get("deployed_at") or "") or "<span class=none>-</span>"}</td>'
            f'<td class="num">{_num(r.get("latency_ms"), ".2f", " ms")}</td></tr>')
    if not rows:
        out.append('<tr><td colspan="10" class="none">no target deploys a model</td></tr>')
    out.append("</tbody></table></section>")
    return "\n".join(out)


def _code_or_dash(value: Any) -> str:
    return f"<code>{e(value)}</code>" if value else '<span class="none">-</span>'


def _classes_section(classes: list[dict], unclassified: list[dict]) -> str:
    out = ['<section id="classes"><h2>Hardware classes</h2>',
           f'<div class="summary">{len(classes)} class(es) from the recorded fingerprints; devices in one class '
           'share one engine per model.</div>']
    for c in classes:
        members = c.get("members") or []
        fields = "".join(f"<dt>{e(k)}</dt><dd><code>{e(_fmt_value(v))}</code></dd>"
                         for k, v in sorted((c.get("fields") or {}).items()))
        member_rows = []
        for m in members:
            other = ", ".join(f"{k}={_fmt_value(v)}" for k, v in sorted((m.get("other") or {}).items()))
            builder = ' <span class="badge ok">builder</span>' if m.get("builder") else ""
            member_rows.append(f'<tr><td>{e(m.get("target"))}{builder}</td><td>{e(m.get("transport"))}</td>'
                               f'<td class="muted wrap">{e(other) or "-"}</td></tr>')
        out.append(
            f'<div class="cls" data-class="{e(c.get("id"))}"><h3><code>{e(c.get("id"))}</code> '
            f'<span class="muted">{e(c.get("backend"))}, {len(members)} member(s)</span></h3>'
            f'<dl>{fields}</dl>'
            f'<details><summary>members and their other fingerprint fields</summary><table><thead><tr>'
            f'<th>target</th><th>transport</th><th>other fingerprint fields (not class-relevant)</th></tr></thead>'
            f'<tbody>{"".join(member_rows)}</tbody></table></details>'
            f'<div class="muted">members: {e(", ".join(m.get("target", "") for m in members))}</div></div>')
    if unclassified:
        out.append('<h3>Targets without a class</h3><table><thead><tr><th>target</th><th>backend</th>'
                   '<th>why</th></tr></thead><tbody>')
        out.extend(f'<tr><td>{e(u.get("target"))}</td><td>{e(u.get("backend"))}</td><td class="wrap">{e(u.get("why"))}</td></tr>'
                   for u in unclassified)
        out.append("</tbody></table>")
    if not classes and not unclassified:
        out.append('<p class="none">no target</p>')
    out.append("</section>")
    return "\n".join(out)


def _engines_section(engines: list[dict], rows: list[dict]) -> str:
    wanted: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r.get("wanted"):
            wanted.setdefault((r["model"], r["wanted"]), []).append(r["target"])
    records = {(rec.get("model"), rec.get("class")): rec for rec in engines}
    missing = {}
    for r in rows:
        pair = (r.get("model"), r.get("class"))
        if r.get("class") and r.get("wanted") and pair not in records:
            missing.setdefault(pair, []).append(r["target"])
    models = sorted({m for m, _ in records} | {m for m, _ in missing}, key=str)
    out = ['<section id="engines"><h2>Engines</h2>',
           '<div class="summary">one engine per model and hardware class, from the engine records '
           '(build time and latency as measured on the builder when it was verified).</div>']
    for model in models:
        out.append(f'<h3>{e(model)}</h3><table class="engines" data-model="{e(model)}"><thead><tr>'
                   '<th>hardware class</th><th>engine key</th><th>size</th><th>build</th><th>latency</th>'
                   '<th>built on</th><th>built at</th><th>used by</th></tr></thead><tbody>')
        for (m, cls), rec in sorted(((k, v) for k, v in records.items() if k[0] == model), key=lambda kv: str(kv[0][1])):
            users = wanted.get((m, rec.get("key")), [])
            used = (e(", ".join(users)) if users
                    else '<span class="badge warn">not wanted by any target now</span>')
            out.append(f'<tr><td><code>{e(cls)}</code></td><td>{_short(rec.get("key"))}</td>'
                       f'<td class="num">{_size(rec.get("size"))}</td>'
                       f'<td class="num">{_seconds(rec.get("build_seconds"))}</td>'
                       f'<td class="num">{_num(rec.get("latency_ms"), ".2f", " ms")}</td>'
                       f'<td>{e(rec.get("built_on") or "") or "<span class=none>-</span>"}</td>'
                       f'<td class="time">{e(rec.get("built_at") or "") or "<span class=none>-</span>"}</td>'
                       f'<td class="wrap">{used}</td></tr>')
        for (m, cls), targets in sorted(((k, v) for k, v in missing.items() if k[0] == model), key=lambda kv: str(kv[0][1])):
            out.append(f'<tr><td><code>{e(cls)}</code></td><td colspan="6"><span class="badge warn">not built yet'
                       f'</span></td><td>{e(", ".join(targets))}</td></tr>')
        out.append("</tbody></table>")
    if not models:
        out.append('<p class="none">no engine recorded yet (run <code>doit deploy</code>)</p>')
    out.append("</section>")
    return "\n".join(out)


def _node_tones(nodes: list[dict], rows: list[dict], unclassified: list[dict]) -> dict[str, str]:
    """A colour for the nodes whose state the records tell: deploys by their rows, fingerprints
    by their probe, engines by whether their model's rows wait for a build."""
    rank = {"ok": 0, "warn": 1, "bad": 2}
    out: dict[str, str] = {}

    def worst(node: str, t: str) -> None:
        if rank[t] > rank.get(out.get(node, "ok"), 0) or node not in out:
            out[node] = t
    for r in rows:
        t = tone(r["state"])
        worst(f"deploy:{r['target']}", t)
        if r.get("class"):
            name = f"{r['model']}~{r['variant']}" if r.get("variant") else r["model"]
            worst(f"engine:{name}@{r['class']}",
                  "warn" if any("not built" in w for w in r["why"]) else "ok")
    for u in unclassified:
        out[f"fingerprint:{u['target']}"] = "bad" if "failed" in (u.get("why") or "") else "warn"
    return out


def _graph_section(graph: dict, rows: list[dict], unclassified: list[dict]) -> str:
    nodes, edges = graph.get("nodes") or [], [tuple(x) for x in graph.get("edges") or []]
    placed, width, height = layout_graph(nodes, edges)
    kinds = {n["id"]: n.get("kind", "") for n in nodes}
    at = {p.id: p for p in placed}
    tones = _node_tones(nodes, rows, unclassified)
    svg = [f'<svg id="task-graph" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="task graph">']
    heads: dict[int, set] = {}
    for p in placed:
        heads.setdefault(p.layer, set()).add(kinds[p.id])
    col_x = {}
    for p in placed:
        col_x.setdefault(p.layer, p.x)
    names = {"export": "export", "engine": "engine", "fingerprint": "fingerprint", "deploy": "deploy target",
             "group": "deploy group"}
    order = list(names)
    for layer, kset in sorted(heads.items()):
        label = " / ".join(names.get(k, k) for k in sorted(kset, key=lambda k: order.index(k) if k in order else 99))
        svg.append(f'<text class="col-head" x="{col_x[layer]:.1f}" y="{MARGIN + 12}">{e(label)}</text>')
    for a, b in edges:
        if a not in at or b not in at:
            continue
        s, t = at[a], at[b]
        x1, y1 = s.x + s.w, s.y + s.h / 2
        x2, y2 = t.x, t.y + t.h / 2
        mid = (x1 + x2) / 2
        style = " direct" if t.layer - s.layer > 1 else " probe" if kinds.get(a) == "fingerprint" else ""
        svg.append(f'<path class="edge{style}" data-from="{e(a)}" data-to="{e(b)}" '
                   f'd="M{x1:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"/>')
    for p in placed:
        label = p.id if len(p.id) <= LABEL_CHARS else p.id[:LABEL_CHARS - 1] + "…"
        t = tones.get(p.id, "")
        svg.append(f'<g class="node {e(kinds[p.id])} {t}" data-task="{e(p.id)}"><title>{e(p.id)}</title>'
                   f'<rect x="{p.x:.1f}" y="{p.y:.1f}" width="{p.w:.1f}" height="{p.h}"/>'
                   f'<text x="{p.x + 8:.1f}" y="{p.y + 15:.1f}">{e(label)}</text></g>')
    svg.append("</svg>")
    legend = ('<div class="legend">'
              '<span><i style="background:#ddf4ff;border-color:#54aeff"></i>export</span>'
              '<span><i style="background:#fbefff;border-color:#c297ff"></i>engine</span>'
              '<span><i style="background:#f6f8fa;border-color:#8c959f"></i>fingerprint</span>'
              '<span><i style="background:#dafbe1;border-color:#4ac26b"></i>deploy (up to date)</span>'
              '<span><i style="background:#fff8c5;border-color:#d4a72c"></i>not up to date</span>'
              '<span><i style="background:#ffebe9;border-color:#ff8182"></i>failing</span>'
              '<span><i style="background:#fff1e5;border-color:#fb8f44"></i>deploy group</span>'
              '<span class="muted">dashed: a target without a recorded class (its engine task appears once it '
              'is probed); hover a node to trace its edges</span></div>')
    return ('<section id="graph"><h2>Task graph</h2>'
            f'<div class="summary">{len(nodes)} tasks, {len(edges)} edges (doit runs them left to right).</div>'
            f'{legend}<details open><summary>show / hide the graph</summary>'
            f'<div class="graph-wrap">{"".join(svg)}</div></details></section>')


def _events_section(events: list[dict]) -> str:
    out = ['<section id="events"><h2>Recent events</h2>',
           f'<div class="summary">the last {len(events)} decisions from <code>logs/events.jsonl</code>, newest '
           'first.</div>',
           '<input class="filter" type="search" placeholder="filter events" data-table="events-table" '
           'aria-label="filter the events">',
           '<table id="events-table"><thead><tr><th>time</th><th>run</th><th>task</th><th>event</th><th>target</th>'
           '<th>key</th><th>seconds</th><th>why</th></tr></thead><tbody>']
    for ev in reversed(events):
        kind = str(ev.get("event") or "")
        t = ("bad" if kind in ("fail", "rollback") else "ok" if kind in ("deploy", "publish") else
             "warn" if kind in ("build", "export") else "plain")
        out.append(f'<tr><td class="muted time">{e(ev.get("ts"))}</td><td><code>{e(ev.get("run"))}</code></td>'
                   f'<td class="wrap task">{e(ev.get("task"))}</td><td><span class="badge {t}">{e(kind)}</span></td>'
                   f'<td>{e(ev.get("target"))}</td><td>{_short(ev.get("key"))}</td>'
                   f'<td class="num">{_num(ev.get("seconds"), ".2f")}</td><td class="wrap">{e(ev.get("why"))}</td></tr>')
    if not events:
        out.append('<tr><td colspan="8" class="none">no events yet</td></tr>')
    out.append("</tbody></table></section>")
    return "\n".join(out)


def write_report(ctx, live: bool = False) -> Path:
    """Gather, render and write `<artifacts>/report/index.html` atomically; returns its path."""
    from kiln.files import atomic_write
    path = ctx.artifacts / "report" / "index.html"
    atomic_write(path, render_report(gather_report(ctx, live=live)))
    return path
