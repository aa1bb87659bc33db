"""A fleet file that is not valid TOML: the line at fault, quoted, and what is wrong in plain words.

tomllib says where its parser stopped ("Unclosed array (at line 9, column 1)"), which is often
not where the mistake is: an array left open is reported at the next key, a string without its
closing quote at the end of the document, a key set twice after its whole (multi-line) value.
The mistake is in the statement the parser was reading when it stopped. That statement starts on
the last line L (at or before the reported one) such that the text *before* L parses: every
statement before it was complete and valid (the parser got past them), and cutting into the
failing statement leaves an unclosed string or array, which does not parse.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from kiln.errors import ConfigError

_AT = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)\s*$")
#: how far back to look for the start of the failing statement (fleet files are small)
MAX_LOOKBACK = 400


def toml_error(path: Path, text: str, exc: tomllib.TOMLDecodeError) -> ConfigError:
    """The ConfigError for a fleet file tomllib refused: `path:line: explanation`, the line, the fix."""
    lines = text.split("\n")
    raw = str(exc)
    found = _AT.search(raw)
    reason = raw[: found.start()] if found else raw
    reported = int(found.group(1)) if found and found.group(1) else len(lines)
    reported = min(max(reported, 1), len(lines))
    line = _statement_start(lines, reported)
    problem, fix = _explain(reason, lines, line)
    quoted = lines[line - 1].rstrip("\r")
    return ConfigError(f"{path}:{line}: not valid TOML: {problem}\n  {line:>5} | {quoted}", hint=fix)


def _parses(lines: list[str]) -> bool:
    try:
        tomllib.loads("\n".join(lines))
    except tomllib.TOMLDecodeError:
        return False
    return True


def _statement_start(lines: list[str], reported: int) -> int:
    for start in range(reported, max(reported - MAX_LOOKBACK, 0), -1):
        if _parses(lines[: start - 1]):
            return start
    return reported


def _first_line(lines: list[str], pattern: re.Pattern, before: int) -> int | None:
    for i, text in enumerate(lines[: before - 1]):
        if pattern.match(text):
            return i + 1
    return None


def _key_re(parts: list[str]) -> str:
    """Dotted key `parts` as TOML may spell each part: bare, "quoted" or 'literal'."""
    return r"\s*\.\s*".join("(?:" + "|".join(re.escape(f) for f in (p, f'"{p}"', f"'{p}'")) + ")" for p in parts)


def _explain(reason: str, lines: list[str], line: int) -> tuple[str, str]:
    text = lines[line - 1]
    if m := re.match(r"Cannot declare \((.*)\) twice", reason):
        parts = re.findall(r"'((?:[^'\\]|\\.)*)'", m.group(1))
        name = ".".join(parts)
        header = re.compile(r"^\s*\[\[?\s*" + _key_re(parts) + r"\s*\]\]?")
        first = _first_line(lines, header, line)
        if first is None:  # defined by a dotted key or an inline table in an enclosing table
            first = _first_line(lines, re.compile(r"^\s*" + _key_re(parts[-1:]) + r"\s*[.=]"), line)
        where = f" (first at line {first})" if first else ""
        if len(parts) == 2 and parts[0] in ("models", "targets"):
            where += f": a duplicate {parts[0][:-1]}"
        return (f"[{name}] is defined twice{where}",
                f"merge the two [{name}] tables into one, or rename one of them: each model and each target "
                f"is one table, and names are unique")
    if reason.startswith("Cannot overwrite a value"):
        if re.match(r"^\s*\[", text):
            table = text.strip().strip("[]").strip()
            leaf = table.split(".")[-1].strip()
            first = _first_line(lines, re.compile(r"^\s*" + _key_re([leaf.strip("\"'")]) + r"\s*="), line)
            where = f" (at line {first})" if first else " above"
            return (f"[{table}] cannot be a table: {table} is already set to a value{where}",
                    f"remove the earlier `{leaf} = ...` or rename the table")
        key = _key_at(text)
        first = _earlier_key(lines, line, key) if key else None
        where = f" (first at line {first})" if first else ""
        return (f"the key {key or 'on this line'} is set twice in the same table{where}",
                "keep one of them: a key may be set once per table")
    if m := re.match(r"Duplicate inline table key '(.*)'", reason):
        return (f"the key {m.group(1)} appears twice in the inline table {{ ... }} on this line",
                "keep one of them")
    if reason.startswith("Unterminated string") and ('"""' in text or "'''" in text):
        return ("the multi-line string opened on this line is never closed",
                "close it with the same three quotes it opens with")
    if reason.startswith("Unterminated string") or reason == "Illegal character '\\n'":
        return ("a string is missing its closing quote",
                "close the string on the same line (\"...\"); a value over several lines needs \"\"\"...\"\"\"")
    if reason.startswith("Unclosed array"):
        return ("the array [ opened on this line is never closed",
                "add the closing ] (an array may span lines; every element but the last ends with a comma)")
    if reason.startswith("Unclosed inline table") or reason.startswith("Invalid initial character for a key part"):
        if "{" in text:
            return ("the inline table { opened on this line is not closed on this line",
                    "add the closing } on the same line: an inline table must fit on one line "
                    "(or write it as a [table] of its own)")
    if reason.startswith("Unescaped '\\'") or "escape" in reason.lower():
        return ("a backslash in a \"...\" string starts an escape sequence (\\n, \\t, \\\\ ...)",
                "write \\\\ for a backslash, or use a 'literal string' in single quotes")
    if reason.startswith("Invalid value"):
        return ("the value after = is not a TOML value",
                "quote strings (\"text\"), write booleans as true/false, arrays as [1, 2], tables as { a = 1 }")
    if reason.startswith("Expected '=' after a key"):
        return ("expected `key = value` on this line", "write `key = value`, or [table] for a table header")
    if reason.startswith("Expected ']' at the end of a table declaration"):
        return ("the table header is not closed", "write it as [name] (or [[name]] for an array of tables)")
    if reason.startswith("Expected newline or end of document"):
        return ("unexpected text after the value", "one `key = value` per line; start comments with #")
    if text.startswith("\ufeff"):
        return ("the file starts with a byte-order mark (BOM)", "save the file as UTF-8 without BOM")
    return (reason[0].lower() + reason[1:] if reason else "syntax error",
            "fix the syntax of this line (TOML: https://toml.io)")


def _key_at(text: str) -> str | None:
    m = re.match(r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*=", text)
    return re.sub(r"\s+", "", m.group(1)) if m else None


def _earlier_key(lines: list[str], line: int, key: str) -> int | None:
    """The line of the same key earlier in the same table (since the last table header)."""
    for i in range(line - 2, -1, -1):
        text = lines[i]
        if re.match(r"^\s*\[", text):
            return None
        if _key_at(text) == key:
            return i + 1
    return None
