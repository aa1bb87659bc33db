"""Progress of long steps (exports, transfers, engine builds, fleet deploys), on stderr, fitted to
where stderr goes.

One `Progress` per run (`Context.progress`); library functions report to it through activities:

    with ctx.progress.activity("export tiny") as act:
        act.phase("torch export")          # named steps, each timed
        act.note(line)                     # a tool's last output line
    with progress.transfer("upload model.onnx to orin-01", size) as t:
        t.advance(len(block))             # bytes: rate and ETA are derived

The renderer is chosen once, when the first activity starts (or `start()` is called):
- rich: stderr is a terminal: a live display (the `rich` library, imported only then) of every
  running activity, redrawn in place; each finished activity leaves one line above it.
- plain: anything else (CI logs, pipes, files): a start line, then at most one line every
  `interval` seconds per activity (10 s; `KILN_PROGRESS_INTERVAL`), then an end line. No
  carriage returns, no escape codes.
- off: nothing.
`KILN_PROGRESS=auto|rich|plain|off` overrides the choice (auto: rich on a terminal, else plain).

Progress never goes to stdout (with `--json` stdout carries the document alone). When the live
display shares the terminal with stdout, lines written to stdout (doit's `.  task` lines) would
tear it: `guard_streams()` routes writes to `sys.stdout`/`sys.stderr` (and kiln's log handlers)
through the display, which clears itself, lets the line through unchanged, and redraws below it.

Thread-safe (`doit -n 4` runs tasks in threads). Creating a Progress does no I/O, starts no
thread and imports nothing outside the standard library.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

log = logging.getLogger(__name__)

ENV = "KILN_PROGRESS"
INTERVAL_ENV = "KILN_PROGRESS_INTERVAL"
MODES = ("auto", "rich", "plain", "off")
#: plain renderer: at most one line per activity this often (seconds)
DEFAULT_INTERVAL = 10.0
#: transfers smaller than this are not shown (a fleet of small files would only add noise)
MIN_TRANSFER_BYTES = 8 << 20
#: prefix of every plain line: easy to grep for, or out of, a CI log
PLAIN_PREFIX = "progress: "
MiB = 1 << 20
_DIGEST = re.compile(r"[0-9a-f]{64}")


# -- formatting (shared by both renderers) -----------------------------------------------

def format_bytes(n: float) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / 1024:.0f} KiB"


def _format_pair(done: float, total: float) -> str:
    """"10.0/80.0 MiB": both in the total's unit."""
    unit, scale, digits = ("GiB", 1 << 30, 2) if total >= 1 << 30 else ("MiB", MiB, 1) if total >= MiB else ("KiB", 1024, 0)
    return f"{done / scale:.{digits}f}/{total / scale:.{digits}f} {unit}"


def format_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def short_name(name: str) -> str:
    """A store entry or file name with its 64-hex digests cut to 12 characters."""
    return _DIGEST.sub(lambda m: m.group()[:12], str(name))


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).replace("\r", " ").split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


# -- activities ----------------------------------------------------------------------------

class Activity:
    """One thing in progress, made by `Progress.activity` / `Progress.transfer`. Every method is
    thread-safe; use it as a context manager (it then finishes as done, or failed on an exception)."""

    def __init__(self, owner: "Progress", label: str, total: int | None, unit: str | None) -> None:
        self._owner = owner
        self.label = _one_line(label, 120)
        self.total = total
        self.unit = unit              # "bytes", or a count's noun ("devices"), or None
        self.done = 0
        self.started = owner.clock()
        self.last_emit = self.started  # plain renderer: when this activity last printed a line
        self.phase_name: str | None = None
        self.phase_started = self.started
        self.phases: list[tuple[str, float]] = []  # finished phases: (name, seconds)
        self.last_line = ""
        self.extra = ""               # e.g. "1 failed" for a fleet count
        self.finished = False
        self.handle = None            # the rich renderer's task id

    # -- reporting ----------------------------------------------------------------------
    def phase(self, name: str) -> None:
        """The activity moved on to step `name` (the previous step's time is kept)."""
        self._owner._change(self, phase=name)

    def advance(self, n: int) -> None:
        """`n` more units (bytes, devices) are done."""
        self._owner._change(self, advance=n)

    def update(self, done: int) -> None:
        """`done` units are done in all."""
        self._owner._change(self, done=done)

    def note(self, line: str) -> None:
        """The last output line of what this activity runs (a builder's log)."""
        if line and line.strip():
            self._owner._change(self, note=line)

    def set_extra(self, text: str) -> None:
        self._owner._change(self, extra=text)

    def finish(self, ok: bool = True) -> None:
        self._owner._finish(self, ok)

    def __enter__(self) -> "Activity":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(ok=exc_type is None)

    # -- texts (called with the owner's lock held) ------------------------------------------
    def _close_phase(self, now: float) -> None:
        if self.phase_name is not None:
            self.phases.append((self.phase_name, now - self.phase_started))
            self.phase_name = None

    def _amount(self) -> str:
        if self.unit == "bytes":
            if self.total:
                pct = 100 * self.done / self.total if self.total else 0
                return f"{_format_pair(self.done, self.total)} ({pct:.0f}%)"
            return format_bytes(self.done)
        if self.unit:
            return f"{self.done}/{self.total} {self.unit}" if self.total is not None else f"{self.done} {self.unit}"
        return ""

    def _rate(self, now: float) -> str:
        elapsed = now - self.started
        if self.unit != "bytes" or elapsed <= 0 or self.done <= 0:
            return ""
        rate = self.done / elapsed
        text = f"{format_bytes(rate)}/s"
        if self.total and self.done < self.total:
            text += f", ETA {format_seconds((self.total - self.done) / rate)}"
        return text

    @property
    def sep(self) -> str:
        """Between the label and a text: "deploy 7/12 devices", "export tiny: torch export"."""
        return " " if self.unit and self.unit != "bytes" else ": "

    def start_text(self) -> str:
        if self.unit == "bytes" and self.total:
            return format_bytes(self.total)
        if self.unit:
            return self._amount()
        return "started"

    def status_text(self, now: float, elapsed: bool = True) -> str:
        """What the activity is doing now: one line, without the label."""
        text = ", ".join(p for p in (self.phase_name, self._amount(), self._rate(now), self.extra) if p)
        if elapsed:
            text += f"{'; ' if text else ''}{format_seconds(now - self.started)} so far"
        if self.last_line:
            text += f"{'; ' if text else ''}last: {self.last_line}"
        return text

    def end_text(self, now: float, ok: bool) -> str:
        took = format_seconds(now - self.started)
        if not ok:
            where = f" (during {self.phase_name})" if self.phase_name else ""
            amount = f", {self._amount()}" if self.unit else ""
            return f"failed after {took}{where}{amount}"
        self._close_phase(now)
        if self.unit == "bytes":
            rate = self.done / (now - self.started) if now > self.started else 0
            text = f"done, {format_bytes(self.done)} in {took} ({format_bytes(rate)}/s)"
        elif self.unit:
            text = f"{self._amount()} in {took}"
        else:
            text = f"done in {took}"
        if self.extra:
            text += f"; {self.extra}"
        shown = [(name, s) for name, s in self.phases if s >= 0.05]  # "0.0 s" says nothing
        if shown:
            text += " (" + ", ".join(f"{name} {format_seconds(s)}" for name, s in shown) + ")"
        return text


class NullActivity:
    """What reporting code gets when nothing is shown: every call does nothing."""
    label = ""

    def phase(self, name: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def update(self, done: int) -> None:
        pass

    def note(self, line: str) -> None:
        pass

    def set_extra(self, text: str) -> None:
        pass

    def finish(self, ok: bool = True) -> None:
        pass

    def __enter__(self) -> "NullActivity":
        return self

    def __exit__(self, *exc) -> None:
        pass


NULL = NullActivity()


def transfer(display: "Progress | None", label: str, total: int) -> Activity | NullActivity:
    """A transfer of `total` bytes shown on `display` (a Progress, or None: not shown)."""
    return display.transfer(label, total) if display is not None else NULL


# -- the facility -----------------------------------------------------------------------------

class Progress:
    """The run's progress display. See the module docstring."""

    def __init__(self, mode: str | None = None, stream: TextIO | None = None, *,
                 interval: float | None = None, min_bytes: int = MIN_TRANSFER_BYTES,
                 clock: Callable[[], float] = time.monotonic, width: int | None = None) -> None:
        self._mode = mode              # None: from KILN_PROGRESS (auto)
        self._stream = stream          # None: sys.stderr when the renderer is chosen
        self._interval = interval      # None: from KILN_PROGRESS_INTERVAL (10 s)
        self._width = width
        self.min_bytes = min_bytes
        self.clock = clock
        self._lock = threading.RLock()
        self._renderer: _Renderer | None = None
        self._active: list[Activity] = []
        self._ticker: threading.Thread | None = None
        self._wake = threading.Event()
        self._guards: list[tuple[object, str, object]] = []  # (owner, attribute, original stream)

    # -- choosing the renderer ----------------------------------------------------------
    @property
    def mode(self) -> str:
        """The renderer in use: "rich", "plain" or "off" (chosen on first use)."""
        return self._resolve().name

    def start(self) -> "Progress":
        """Choose the renderer now (a run calls this before its tasks start, so the renderer
        writes to the real stderr, not to a stream a task runner swapped in)."""
        self._resolve()
        return self

    def _resolve(self) -> "_Renderer":
        with self._lock:
            if self._renderer is None:
                self._renderer = self._choose()
            return self._renderer

    def _choose(self) -> "_Renderer":
        stream = self._stream if self._stream is not None else sys.stderr
        stream = getattr(stream, "_kiln_original", stream)  # never render into our own guard
        asked = (self._mode or os.environ.get(ENV, "") or "auto").strip().lower()
        if asked not in MODES:
            log.warning("%s=%r is not one of %s; using auto", ENV, asked, "|".join(MODES))
            asked = "auto"
        if asked == "off" or stream is None:
            return _Off()
        mode = asked
        if mode == "auto":
            dumb = os.environ.get("TERM", "") in ("dumb", "unknown")  # no cursor movement there
            mode = "rich" if _is_terminal(stream) and not dumb else "plain"
        if mode == "rich":
            from importlib.util import find_spec
            if find_spec("rich") is None:  # not imported here: the display imports it when first shown
                if asked == "rich":
                    log.warning("%s=rich but the rich library is not installed (pip install rich); "
                                "showing plain progress lines", ENV)
                mode = "plain"
        if mode == "rich":
            return _Rich(stream, force=asked == "rich", width=self._width)
        return _Plain(stream, self._interval_seconds())

    def _interval_seconds(self) -> float:
        if self._interval is not None:
            return float(self._interval)
        raw = os.environ.get(INTERVAL_ENV, "")
        if raw:
            try:
                value = float(raw)
                if value >= 0:
                    return value
            except ValueError:
                pass
            log.warning("%s=%r is not a number of seconds; using %s", INTERVAL_ENV, raw, DEFAULT_INTERVAL)
        return DEFAULT_INTERVAL

    # -- making activities --------------------------------------------------------------------
    def activity(self, label: str, total: int | None = None, unit: str | None = None) -> Activity | NullActivity:
        """Start showing `label` (with a count of `total` `unit`s when given)."""
        renderer = self._resolve()
        if renderer.name == "off":
            return NULL
        with self._lock:
            act = Activity(self, label, total, unit)
            self._active.append(act)
            renderer.started(act, act.started)
            if renderer.wants_ticks:
                self._start_ticker()
            return act

    def transfer(self, label: str, total: int) -> Activity | NullActivity:
        """Start showing a transfer of `total` bytes; nothing for one below `min_bytes`."""
        if total is None or total < self.min_bytes:
            return NULL
        return self.activity(label, total=total, unit="bytes")

    # -- called by activities -------------------------------------------------------------------
    def _change(self, act: Activity, *, phase: str | None = None, advance: int | None = None,
                done: int | None = None, note: str | None = None, extra: str | None = None) -> None:
        with self._lock:
            if act.finished:
                return
            now = self.clock()
            if phase is not None:
                act._close_phase(now)
                act.phase_name, act.phase_started, act.last_line = phase, now, ""
            if advance is not None:
                act.done += advance
            if done is not None:
                act.done = done
            if note is not None:
                act.last_line = _one_line(note)
            if extra is not None:
                act.extra = extra
            self._renderer.changed(act, now)

    def _finish(self, act: Activity, ok: bool) -> None:
        with self._lock:
            if act.finished:
                return
            act.finished = True
            if act in self._active:
                self._active.remove(act)
            now = self.clock()
            self._renderer.finished(act, now, ok)
            if not self._active:
                self._wake.set()

    # -- plain heartbeat: an activity that stops reporting still prints every interval --------
    def tick(self) -> None:
        """Let the renderer print what is due (the ticker thread calls this)."""
        with self._lock:
            if self._renderer is None:
                return
            now = self.clock()
            for act in list(self._active):
                self._renderer.changed(act, now)

    def _start_ticker(self) -> None:
        if self._ticker is not None and self._ticker.is_alive():
            return
        self._wake.clear()
        self._ticker = threading.Thread(target=self._tick_loop, name="kiln-progress", daemon=True)
        self._ticker.start()

    def _tick_loop(self) -> None:
        period = max(0.2, min(1.0, self._renderer.interval / 4))
        while True:
            self._wake.wait(period)
            with self._lock:
                if not self._active:
                    self._ticker = None
                    return
                self._wake.clear()
            self.tick()

    # -- sharing the terminal with stdout -----------------------------------------------------
    def guard(self, stream: TextIO) -> TextIO:
        """`stream`, or a GuardedStream over it when the live display is on the same kind of
        terminal (for a stream captured before `guard_streams`, like a doit reporter's)."""
        if self._resolve().name != "rich" or not _is_terminal(stream) or isinstance(stream, GuardedStream):
            return stream
        return GuardedStream(stream, self)

    def guard_streams(self) -> None:
        """While the live display is on a terminal: route writes to sys.stdout, sys.stderr and the
        kiln/root log handlers through it (see the module docstring). Does nothing for the plain
        renderer. Undone by `release_streams()` / `close()`."""
        renderer = self._resolve()
        if renderer.name != "rich":
            return
        with self._lock:
            if self._guards:
                return
            for name in ("stdout", "stderr"):
                stream = getattr(sys, name)
                if _is_terminal(stream) and not isinstance(stream, GuardedStream):
                    self._guards.append((sys, name, stream))
                    setattr(sys, name, GuardedStream(stream, self))
            for logger in (logging.getLogger("kiln"), logging.getLogger()):
                for handler in logger.handlers:
                    stream = getattr(handler, "stream", None)
                    if isinstance(handler, logging.StreamHandler) and _is_terminal(stream) \
                            and not isinstance(stream, GuardedStream):
                        self._guards.append((handler, "stream", stream))
                        handler.stream = GuardedStream(stream, self)

    def release_streams(self) -> None:
        with self._lock:
            guards, self._guards = self._guards, []
        for owner, name, original in reversed(guards):
            current = getattr(owner, name, None)
            if isinstance(current, GuardedStream):
                current.flush_partial()
            if current is not original and isinstance(current, GuardedStream):
                setattr(owner, name, original)

    def _write_through(self, stream: TextIO, text: str) -> None:
        with self._lock:
            renderer = self._renderer
            if renderer is None:
                stream.write(text)
                stream.flush()
                return
            with renderer.suspended():
                stream.write(text)
                stream.flush()

    def _live(self) -> bool:
        with self._lock:
            return self._renderer is not None and self._renderer.live

    def close(self) -> None:
        """Finish whatever is still shown (as failed: it never said it was done), stop the
        display and the ticker, give the streams back. The Progress can be used again after."""
        with self._lock:
            for act in list(self._active):
                self._finish(act, ok=False)
            renderer = self._renderer
            if renderer is not None:
                renderer.close()
            self._wake.set()
        self.release_streams()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class GuardedStream:
    """A text stream whose whole lines are written while the live display steps aside (a part
    line waits for its newline, or for the display to stop). Everything else is the stream's."""

    def __init__(self, stream: TextIO, progress: Progress) -> None:
        self._kiln_original = stream
        self._progress = progress
        self._partial = ""

    def write(self, text: str) -> int:
        with self._progress._lock:
            head, newline, tail = (self._partial + text).rpartition("\n")
            if not newline:
                self._partial = tail
            else:
                self._partial = tail
                self._progress._write_through(self._kiln_original, head + "\n")
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        with self._progress._lock:
            if self._partial and not self._progress._live():
                self.flush_partial()
            self._kiln_original.flush()

    def flush_partial(self) -> None:
        with self._progress._lock:
            text, self._partial = self._partial, ""
            if text:
                self._progress._write_through(self._kiln_original, text)

    def isatty(self) -> bool:
        return _is_terminal(self._kiln_original)

    def __getattr__(self, name: str):
        return getattr(self._kiln_original, name)


# -- renderers ------------------------------------------------------------------------------------
# Called with the Progress's lock held.

class _Renderer:
    name = ""
    wants_ticks = False
    interval = DEFAULT_INTERVAL
    live = False

    def started(self, act: Activity, now: float) -> None:
        pass

    def changed(self, act: Activity, now: float) -> None:
        pass

    def finished(self, act: Activity, now: float, ok: bool) -> None:
        pass

    @contextmanager
    def suspended(self) -> Iterator[None]:
        yield

    def close(self) -> None:
        pass


class _Off(_Renderer):
    name = "off"


class _Plain(_Renderer):
    """Whole lines, one write each: a start line, a line per `interval` while running, an end line."""
    name = "plain"
    wants_ticks = True

    def __init__(self, stream: TextIO, interval: float) -> None:
        self.stream = stream
        self.interval = interval

    def _emit(self, text: str) -> None:
        try:
            self.stream.write(PLAIN_PREFIX + _one_line(text, 400) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe must not fail the work it reports on
            pass

    def started(self, act, now):
        self._emit(f"{act.label}{act.sep}{act.start_text()}")
        act.last_emit = now

    def changed(self, act, now):
        if now - act.last_emit >= self.interval:
            self._emit(f"{act.label}{act.sep}{act.status_text(now)}")
            act.last_emit = now

    def finished(self, act, now, ok):
        self._emit(f"{act.label}{act.sep}{act.end_text(now, ok)}")


class _Rich(_Renderer):
    """A rich live display of the running activities; finished ones leave a line above it.
    rich is imported when the first activity is shown."""
    name = "rich"

    def __init__(self, stream: TextIO, force: bool = False, width: int | None = None) -> None:
        self.stream = stream
        self.force = force
        self.width = width
        self.console = None
        self.bar = None

    @property
    def live(self) -> bool:
        return self.bar is not None and self.bar.live.is_started

    def _ensure(self) -> None:
        if self.bar is not None:
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress as RichProgress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = Console(file=self.stream, force_terminal=True if self.force else None,
                               width=self.width, highlight=False, soft_wrap=False)
        self.bar = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24),
                                TimeElapsedColumn(), TextColumn("{task.fields[detail]}"),
                                console=self.console, transient=True, redirect_stdout=False,
                                redirect_stderr=False, refresh_per_second=8)

    def started(self, act, now):
        self._ensure()
        act.handle = self.bar.add_task(act.label, total=act.total, completed=act.done,
                                       detail=act.status_text(now, elapsed=False))
        if not self.bar.live.is_started:
            self.bar.start()

    def changed(self, act, now):
        if act.handle is not None:
            self.bar.update(act.handle, completed=act.done, detail=act.status_text(now, elapsed=False))

    def finished(self, act, now, ok):
        if act.handle is None:
            return
        self.bar.remove_task(act.handle)
        self.bar.refresh()  # the line below is printed with the display as it is now, without this one
        mark = "[green]✓[/green]" if ok else "[red]✗[/red]"
        from rich.text import Text
        line = Text.from_markup(f"{mark} ")
        line.append(f"{act.label}{act.sep}{act.end_text(now, ok)}")
        self.console.print(line)
        if not self.bar.tasks:
            self.bar.stop()

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Clear the live display, let the caller write, draw it again below what was written.
        (rich keeps the drawn height in LiveRender._shape; it is reset so the next draw does not
        move up over the caller's lines. rich is pinned in requirements-dev.txt; tests/test_progress.py
        checks this against a terminal.)"""
        if not self.live or not self.console.is_terminal:
            yield
            return
        live = self.bar.live
        with live._lock:
            # the cursor stands at the end of the drawn lines: back to the start of the first, erased
            self.console.control(live._live_render.position_cursor())
            live._live_render._shape = None
            try:
                yield
            finally:
                live.refresh()

    def close(self):
        if self.bar is not None and self.bar.live.is_started:
            self.bar.stop()
