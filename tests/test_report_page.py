"""`doit report`: the static fleet page, rendered for real in headless Chromium.

The browser test builds a real project (tiny model, local target), runs `doit deploy:local`
and `doit report` as subprocesses, and opens the page from file:// in Debian's chromium
through selenium and /usr/bin/chromedriver (`make sysdeps` installs both; the test is
skipped, saying so, where they are absent). The unit tests check escaping and the layout
of a 50-target task graph without a browser.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kiln_project import Project
from kiln.config import load_fleet
from kiln.devices.hwclass import hardware_class
from kiln.pipeline.report_page import (NODE_H, layout_graph, normalize_status_row, render_report, task_graph)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text (as the browser would see it)."""
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> Tags:
    p = Tags()
    p.feed(page)
    p.close()
    return p


# -- escaping ------------------------------------------------------------------------------

EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_hostile_names_fingerprints_and_event_text_are_escaped():
    data = {
        "generated_at": "now", "fleet_file": f"/srv/{EVIL}/targets.toml", "artifacts": EVIL, "store": EVIL,
        "live": False,
        "status": [normalize_status_row({
            "target": f"t{EVIL}", "model": f"m{EVIL}", "class": f"c{EVIL}", "wanted": f'k"{EVIL}',
            "active": EVIL, "previous": None, "state": f"outdated {EVIL}", "drift": [f"TensorRT 8 → {EVIL}"],
            "why": [f"why {EVIL}"], "pinned": EVIL, "deployed_at": EVIL, "latency_ms": 1.5})],
        "classes": [{"id": f"c{EVIL}", "backend": "onnxruntime", "digest": "d",
                     "fields": {"cpu_flags": ["avx2", EVIL], f"f{EVIL}": EVIL},
                     "members": [{"target": f"t{EVIL}", "transport": EVIL, "builder": True,
                                  "other": {"cpu_model": EVIL}}]}],
        "unclassified": [{"target": f"u{EVIL}", "backend": EVIL, "why": f"last probe failed: {EVIL}"}],
        "engines": [{"model": f"m{EVIL}", "class": f"c{EVIL}", "key": f'k"{EVIL}', "size": 10, "built_on": EVIL,
                     "built_at": EVIL, "build_seconds": 1.0, "latency_ms": 2.0}],
        "events": [{"ts": EVIL, "task": f"deploy:{EVIL}", "event": EVIL, "key": EVIL, "target": EVIL,
                    "why": f"because {EVIL}", "seconds": 1, "run": EVIL}],
        "graph": {"nodes": [{"id": f"export:m{EVIL}", "kind": "export"}, {"id": f"deploy:t{EVIL}", "kind": EVIL}],
                  "edges": [(f"export:m{EVIL}", f"deploy:t{EVIL}")]},
    }
    page = render_report(data)
    parsed = parse(page)
    tags = [t for t, _ in parsed.tags]
    assert tags.count("script") == 1 and "img" not in tags  # only the page's own script
    assert not [a for _, attrs in parsed.tags for a in attrs if a.startswith("on")]
    assert EVIL not in page and "alert(1)" in page  # there, but only as text
    text = "".join(parsed.text)
    for shown in (f"why {EVIL}", f"because {EVIL}", f"TensorRT 8 → {EVIL}", f"last probe failed: {EVIL}"):
        assert shown in text
    # attribute values survive as the same strings (quotes escaped, not cut)
    nodes = [a["data-task"] for t, a in parsed.tags if t == "g" and "data-task" in a]
    assert nodes == [f"export:m{EVIL}", f"deploy:t{EVIL}"]


def test_old_status_rows_are_read_too():
    row = normalize_status_row({"target": "a", "model": "m", "class": "c", "engine_key": "k1", "deployed": "k0",
                                "drift": [], "why": ["a newer engine is waiting to be deployed"]})
    assert (row["wanted"], row["active"], row["state"]) == ("k1", "k0", "outdated")
    assert normalize_status_row({"target": "a", "model": "m", "why": ["up to date"]})["state"] == "up to date"


# -- layout ----------------------------------------------------------------------------------

def fifty_targets(tmp_path: Path):
    """A fleet file of 50 ssh targets in 3 hardware classes, 2 models, 5 groups (nothing contacted)."""
    text = ['[models.det]\nfactory = "examples.tiny_detector:build_model"\ncheckpoint = "det.pt"\n'
            'inputs = { pixel_values = [1, 3, 32, 32] }\noutputs = ["logits"]\n',
            '[models.seg]\nfactory = "examples.tiny_detector:build_model"\ncheckpoint = "seg.pt"\n'
            'inputs = { pixel_values = [1, 3, 32, 32] }\noutputs = ["logits"]\n']
    for i in range(50):
        models = '["det", "seg"]' if i % 4 == 0 else '["det"]'
        text.append(textwrap.dedent(f"""
            [targets.cam-{i:02d}]
            transport = "ssh"
            host = "10.0.{i // 200}.{i % 200 + 1}"
            models = {models}
            groups = ["line-{i % 5}"]
            install_dir = "/opt/kiln"
            """))
    path = tmp_path / "targets.toml"
    path.write_text("".join(text))
    fleet = load_fleet(path, tmp_path / "artifacts")
    ort = ("1.30.0", "1.31.0", "1.32.0")
    classes = {name: hardware_class("onnxruntime", {"arch": "x86_64", "cpu_flags": ["avx2"],
                                                    "onnxruntime": ort[i % 3]})
               for i, name in enumerate(fleet.targets) if i != 7}  # cam-07 never probed
    return fleet, classes


def test_task_graph_of_fifty_targets_is_laid_out_without_overlaps(tmp_path):
    fleet, classes = fifty_targets(tmp_path)
    nodes, edges = task_graph(fleet, classes)
    ids = [n["id"] for n in nodes]
    assert len(ids) == len(set(ids))
    engines = {i for i in ids if i.startswith("engine:")}
    assert engines == {f"engine:{m}@{hw.id}" for t, hw in classes.items() for m in fleet.targets[t].models}
    assert ("export:det", "deploy:cam-07") in edges  # no class yet: its export feeds the deploy directly
    assert ("deploy:cam-03", "deploy:line-3") in edges and ("fingerprint:cam-03", "deploy:cam-03") in edges

    placed, width, height = layout_graph(nodes, edges)
    at = {p.id: p for p in placed}
    assert set(at) == set(ids)
    column = {kind: {at[i].layer for i in ids if i.startswith(kind)}
              for kind in ("export:", "engine:", "fingerprint:")}
    deploys = {at[f"deploy:{t}"].layer for t in fleet.targets}
    groups = {at[f"deploy:{g}"].layer for g in fleet.groups()}
    assert column["export:"] == {0} and column["engine:"] == {1} and column["fingerprint:"] == {1}
    assert deploys == {2} and groups == {3}
    for layer in range(4):
        ys = sorted(p.y for p in placed if p.layer == layer)
        assert all(b - a >= NODE_H for a, b in zip(ys, ys[1:])), f"nodes overlap in column {layer}"
    for p in placed:
        assert 0 <= p.x and p.x + p.w <= width and 0 <= p.y and p.y + p.h <= height
    # the tallest column decides the height: the spreading pass does not stretch the drawing
    tallest = max(sum(p.layer == c for p in placed) for c in range(4))
    assert height <= (tallest + 4) * 30 + 100
    page = render_report({"status": [], "graph": {"nodes": nodes, "edges": edges}})
    drawn = [a["data-task"] for t, a in parse(page).tags if t == "g"]
    assert sorted(drawn) == sorted(ids)


# -- the page in a real browser ----------------------------------------------------------------

def browser_missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is not installed (`make sysdeps` installs Debian's chromium and chromium-driver)"
    return None


def open_browser(tmp_path: Path, width: int, height: int):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def test_report_page_in_chromium(tmp_path):
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    p = Project(tmp_path)
    p.doit("deploy:local")
    # a report takes no artifacts lock: it runs while another run holds it
    lock = os.open(p.artifacts / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run = p.doit("report", timeout=60)
    finally:
        os.close(lock)
    page = p.artifacts / "report" / "index.html"
    assert page.resolve().as_uri() in run.out and "waiting" not in run.out
    assert not list(page.parent.glob(".index.html.*"))  # written atomically: no temp file left
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # nothing to fetch from anywhere
    expected = {line.split()[0] for line in p.doit("list", "--all").out.splitlines()
                if line.split() and line.split()[0].split(":")[0] in ("export", "engine", "fingerprint", "deploy")
                and ":" in line.split()[0]}
    assert {"export:tiny", "fingerprint:local", "deploy:local"} <= expected and any(
        n.startswith("engine:tiny@") for n in expected)

    from selenium.webdriver.common.by import By
    driver = open_browser(tmp_path, 1100, 800)
    try:
        driver.get(page.resolve().as_uri())
        row = driver.find_element(By.CSS_SELECTOR, '#fleet-table tr[data-target="local"][data-model="tiny"]')
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        assert cells[0] == "local" and cells[1] == "tiny"
        assert row.find_element(By.CSS_SELECTOR, "td.state .badge").text == "up to date"
        assert row.get_attribute("data-state") == "ok"
        assert cells[2].startswith("cpu-") and cells[3] == cells[4] != "-"  # wanted == active
        nodes = {g.get_attribute("data-task") for g in driver.find_elements(By.CSS_SELECTOR, "svg#task-graph g.node")}
        assert nodes == expected
        box = driver.find_element(By.CSS_SELECTOR, 'svg#task-graph g.node[data-task="deploy:local"] rect').rect
        assert box["width"] > 50 and box["height"] > 10  # drawn, not just present
        edges = driver.find_elements(By.CSS_SELECTOR, "svg#task-graph path.edge")
        assert len(edges) == 3  # export -> engine -> deploy, fingerprint -> deploy
        assert driver.find_elements(By.CSS_SELECTOR, "#events-table tbody tr")  # the deploy's decisions
        assert "deploy:local" in driver.find_element(By.ID, "events-table").text
        # the filter box (inline JS) hides rows that do not match
        box = driver.find_element(By.CSS_SELECTOR, 'input[data-table="fleet-table"]')
        box.send_keys("no-such-target")
        assert not row.is_displayed()
        box.clear()
        box.send_keys("tiny")
        assert row.is_displayed()
        resources = driver.execute_script("return performance.getEntriesByType('resource').length")
        assert resources == 0
        severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert severe == []
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
    shutil.copyfile(shot, page.parent / "screenshot.png")
    assert (page.parent / "screenshot.png").stat().st_size == shot.stat().st_size
    assert "records only: no device was contacted" in html

    # --live: the active releases, deploy times and smoke-test latencies as the device reports them
    p.doit("report", "--live", timeout=60)
    live = parse(page.read_text())
    assert "live: active releases read from the devices" in "".join(live.text)
    cells = row_cells(page.read_text(), "local", "tiny")
    release = p.active()
    assert release and cells["wanted"] == cells["active"] == release[:12]
    assert cells["state"].startswith("up to date") and cells["deployed"][:4].isdigit()
    assert cells["latency"].endswith(" ms")


def row_cells(page: str, target: str, model: str) -> dict[str, str]:
    """The text of each cell of one fleet table row, by column name."""
    class Row(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.depth, self.cells = 0, []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "tr" and a.get("data-target") == target and a.get("data-model") == model:
                self.depth = 1
            elif self.depth and tag == "td":
                self.cells.append("")

        def handle_endtag(self, tag):
            if tag == "tr":
                self.depth = 0

        def handle_data(self, data):
            if self.depth and self.cells:
                self.cells[-1] += data
    parser = Row()
    parser.feed(page)
    names = ("target", "model", "class", "wanted", "active", "previous", "state", "drift", "deployed", "latency")
    assert len(parser.cells) == len(names), parser.cells
    return dict(zip(names, (c.strip() for c in parser.cells)))
