"""The output collector both transports use: bytes in, text lines out, live."""
from __future__ import annotations

import codecs

from kiln.transports.base import Stream


class LineSink:
    """Collects a byte stream as UTF-8 text (undecodable bytes replaced) and hands each
    complete line to `stream` as it arrives. With `pid_mark`, the first line starting
    with it is taken out of the output and its number kept in `pid`."""

    def __init__(self, stream: Stream | None, pid_mark: str | None = None) -> None:
        self.stream = stream
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.parts: list[str] = []
        self.partial = ""
        self.pid_mark = pid_mark
        self.pid: int | None = None

    def feed(self, data: bytes) -> None:
        self._text(self.decoder.decode(data))

    def _text(self, text: str) -> None:
        if not text:
            return
        self.partial += text
        if "\n" not in self.partial:
            return
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            self._line(line + "\n")

    def _line(self, line: str) -> None:
        if self.pid_mark and self.pid is None and line.startswith(self.pid_mark):
            try:
                self.pid = int(line[len(self.pid_mark):].strip())
            except ValueError:
                pass
            return
        self.parts.append(line)
        if self.stream:
            self.stream(line.rstrip("\n"))

    def close(self) -> None:
        """End of stream: decode what is left and pass on a last line without newline."""
        self._text(self.decoder.decode(b"", final=True))
        if self.partial:
            line, self.partial = self.partial, ""
            self._line(line)

    @property
    def text(self) -> str:
        return "".join(self.parts)
