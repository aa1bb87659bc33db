"""Writing the small part of TOML a fleet file needs, and replacing one table in a file's text.

Python reads TOML (tomllib) but cannot write it. A fleet file written here holds strings,
integers, floats, booleans, arrays of those and inline tables; that is all `render_value` knows.
Editing keeps the rest of a file as it was, comments included: `replace_table` swaps the lines
of one `[table]` for new ones, and every output is checked by reading it back with tomllib.
"""
from __future__ import annotations

import math
import re
import tomllib
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def render_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped (TOML 1.0)."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def render_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else render_string(key)


def render_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return render_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{render_key(str(k))} = {render_value(v)}" for k, v in value.items()) + " }" \
            if value else "{}"
    raise TypeError(f"cannot write a {type(value).__name__} to TOML: {value!r}")


def render_table(path: list[str], values: dict[str, Any]) -> str:
    """`[a.b]` and its `key = value` lines (values that are tables are written inline)."""
    lines = ["[" + ".".join(render_key(p) for p in path) + "]"]
    lines += [f"{render_key(k)} = {render_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _header_re(path: list[str]) -> re.Pattern:
    forms = []
    for part in path:
        spelled = {part, render_string(part), f"'{part}'"}
        forms.append("(?:" + "|".join(re.escape(s) for s in sorted(spelled, key=len, reverse=True)) + ")")
    return re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(forms) + r"\s*\]\s*(?:#.*)?$")


def _top_level_lines(lines: list[str]) -> list[int]:
    """Indexes of the lines that start a table header (`[x]`, `[[x]]`) at the top level: a line
    starting with '[' inside a multi-line string or array is not one (the text before a real header
    is complete TOML on its own)."""
    out = []
    for i, line in enumerate(lines):
        if line.lstrip().startswith("["):
            try:
                tomllib.loads("".join(lines[:i]))
            except tomllib.TOMLDecodeError:
                continue
            out.append(i)
    return out


def table_spans(text: str, paths: list[list[str]]) -> dict[tuple[str, ...], tuple[int, int]]:
    """{path: (first, end)} line indexes of each `[path]` table found in `text`: from its header to
    the line before the next header, less the blank and comment lines just before that header
    (they usually belong to the next table). Tables not written as a `[path]` header are absent."""
    lines = text.splitlines(keepends=True)
    headers = _top_level_lines(lines)
    patterns = {tuple(p): _header_re(p) for p in paths}
    spans = {}
    for n, i in enumerate(headers):
        for path, pattern in patterns.items():
            if path not in spans and pattern.match(lines[i].rstrip("\r\n")):
                end = headers[n + 1] if n + 1 < len(headers) else len(lines)
                while end > i + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
                    end -= 1
                spans[path] = (i, end)
                break
    return spans


def find_table(text: str, path: list[str]) -> tuple[int, int] | None:
    return table_spans(text, [path]).get(tuple(path))


def replace_tables(text: str, new: dict[tuple[str, ...], str]) -> str:
    """`text` with the lines of each table `[path]` replaced by `new[path]` (a rendered table)."""
    spans = table_spans(text, [list(p) for p in new])
    missing = [".".join(p) for p in new if tuple(p) not in spans]
    if missing:
        raise KeyError(", ".join(missing))
    lines = text.splitlines(keepends=True)
    for path, (first, end) in sorted(spans.items(), key=lambda item: item[1][0], reverse=True):
        lines[first:end] = [new[path]]
    return "".join(lines)


def replace_table(text: str, path: list[str], new: str) -> str:
    """`text` with the lines of table `[path]` replaced by `new` (a rendered table)."""
    return replace_tables(text, {tuple(path): new})
