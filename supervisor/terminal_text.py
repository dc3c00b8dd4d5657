"""Text an agent or a user wrote, made safe to show in a terminal (and to quote in a prompt).

Everything a CLI prints and every task text is hostile: an escape sequence in it can retitle the
user's terminal, clear the screen or worse, and a `[bold]` or `[/]` in it must not be read as rich
markup. Escape sequences and control characters are removed here (newlines and tabs kept); rich
only ever gets the result as a `Text`, never as markup (see cli/render.py). `--raw` skips this.
Upstream output quoted in a dependent task's prompt is cleaned the same way (prompt_blocks.py).
"""
from __future__ import annotations

import re

# CSI, OSC (ended by BEL or ST), other string controls, and two-byte escapes.
ESCAPES = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[PX^_][^\x1b]*(?:\x1b\\)?|[ -/]*[0-~])")
CONTROLS = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")
# C1 controls once decoded: terminals that read UTF-8 C1 (xterm, VTE) act on them (U+009B alone
# is a CSI, U+009D an OSC). Removed from the text, not the bytes, where a removal could join the
# bytes around it into a new one.
# Bidirectional overrides and isolates (U+202A-202E, U+2066-2069) go with them: they make a line
# read backwards, so shown text would not say what it holds.
C1_CONTROLS = re.compile("[\x80-\x9f\u202a-\u202e\u2066-\u2069]")
# The same for text, where C1 controls (U+0080-U+009F, e.g. U+009B, a one-character CSI) go too.
TEXT_ESCAPES = re.compile(ESCAPES.pattern.decode("latin-1"))
TEXT_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean_line(line: bytes) -> bytes:
    """One line of output as text: escape sequences and control characters gone, a line a
    progress bar redrew with \\r as it was shown last."""
    line = ESCAPES.sub(b"", line).rstrip(b"\r")
    if b"\r" in line:
        line = line.rsplit(b"\r", 1)[1]
    text = CONTROLS.sub(b"", line).decode("utf-8", "replace")
    if not text.isascii():  # (most lines are: no second pass for them)
        text = C1_CONTROLS.sub("", text)
    return text.encode("utf-8")


def clean_text(text: str) -> str:
    """Output of any length (a task's kept output, a log's end) safe for a terminal or a prompt:
    each line as clean_line makes it (a progress bar's redraws as last shown), tabs kept, lone
    surrogates (undecodable bytes) as '?'. Text someone wrote goes through clean_written."""
    lines = []
    for line in text.split("\n"):
        line = TEXT_ESCAPES.sub("", line).rstrip("\r")
        if "\r" in line:
            line = line.rsplit("\r", 1)[1]
        lines.append(TEXT_CONTROLS.sub("", line))
    return "\n".join(lines).encode("utf-8", "replace").decode("utf-8")


def clean_written(text: str) -> str:
    """Text someone wrote (a task's description, a note, a reason) as clean_text makes it, but a
    carriage return starts a new line: clean_text shows output as a terminal last showed it (a
    progress bar's redraws), which in a text would hide what comes before its \r from the user
    while the agent still reads it."""
    return clean_text(text.replace("\r\n", "\n").replace("\r", "\n"))


NAME_NEEDS_QUOTES = re.compile('[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069"\\\\\udc80-\udcff]')
_NAME_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r", '"': '\\"', "\\": "\\\\"}


def quoted_name(name: str) -> str:
    """A file name on one line, as it is when plain, else quoted as git quotes it: in double
    quotes, a tab, newline, quote or backslash escaped, any other control character (and a lone
    surrogate: an undecodable byte) as octal bytes. A name holding an escape sequence or a newline
    is then shown as what it is, neither obeyed nor removed nor split over two lines."""
    if not NAME_NEEDS_QUOTES.search(name):
        return name

    def escaped(match: re.Match) -> str:
        char = match.group()
        if char in _NAME_ESCAPES:
            return _NAME_ESCAPES[char]
        raw = char.encode("utf-8", "surrogateescape")
        return "".join(f"\\{byte:03o}" for byte in raw)
    return '"' + NAME_NEEDS_QUOTES.sub(escaped, name) + '"'
