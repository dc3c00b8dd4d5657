"""What a CLI's output says about its run, where its exit status does not tell the truth.

Real CLIs mislead an exit status: aider exits 0 after failing to reach its model (only a
`litellm...Error` line says so), codex without its service prints "Reconnecting... waiting for
network" forever, and a CLI that asks a question waits for an answer nobody types. The runner's
pump feeds each batch of output to an OutputWatch and asks it at its deadlines; the watch says
what to do (answer, stop a stalled CLI, show the agent waiting for input); the runner does it.

The pump moves ~100 MB/s, so the watch does no work per byte in Python: per batch it keeps the
output's last lines (found with rfind/split in C over the batch's end only, at most TAIL_BYTES),
and looks at every line only in a small batch (a retry loop prints a line every few seconds; a
CLI printing flat out is not stuck). Answers are looked for in the last line as pexpect's expect()
does over its buffer's window (its searcher_re: the first pattern to match wins). fail_patterns
cost nothing while the CLI runs: they are searched once, in the task's kept tail, when it exits.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pexpect.expect import searcher_re

from .agent_log import last_holding
from .terminal_text import clean_line

TAIL_BYTES = 4096          # of a batch, only the end is looked at (a batch this small: each of its lines)
LINE_BYTES = 4096          # a line is judged by its last this many bytes
MAX_ANSWERS = 100          # per task: a CLI asking the same thing over and over is then left to stall
SHOWN_CHARS = 200          # a line quoted in a reason, an event or `tt status`


@dataclass(frozen=True)
class Answer:
    expect: str               # the regex, as the user wrote it
    send: bytes               # what is typed into the CLI's terminal


@dataclass(frozen=True)
class Notice:
    """Something the runner acts on. kind: "answer" (type answer.send; line is the prompt),
    "stalled" (stop the CLI; line says why), "waiting" (line is the question), "resumed" (output
    came after a question)."""

    kind: str
    line: str = ""
    answer: Answer | None = None


RESUMED = Notice("resumed")


def cleaned(line: bytes) -> str:
    """A raw line of output as text (terminal_text.clean_line), stripped: what patterns look at,
    whole (a question or an error at the end of a long line is still found)."""
    return clean_line(line).decode("utf-8", "replace").strip()


def cut(text: str, keep_end: bool = False) -> str:
    """`text` cut to SHOWN_CHARS to be shown (its end kept for a prompt, which asks at its end)."""
    if len(text) <= SHOWN_CHARS:
        return text
    return "\u2026" + text[1 - SHOWN_CHARS:] if keep_end else text[:SHOWN_CHARS - 1] + "\u2026"


def shown(line: bytes) -> str:
    """A raw line of output as text to show: cleaned, stripped, cut."""
    return cut(cleaned(line))


def failure_line(tail: bytes, patterns: list[re.Pattern]) -> str:
    """The last line of `tail` (a task's kept output) that a fail pattern matches, cleaned; "" if none."""
    if not patterns:
        return ""
    for raw in reversed(tail.split(b"\n")):
        text = cleaned(raw)
        if text and any(p.search(text) for p in patterns):
            return cut(text)
    return ""


class OutputWatch:
    """One agent's rules (its CliSpec's, plus answers of its own), applied to one task at a time."""

    def __init__(self, spec, answers: tuple[tuple[str, str], ...] = ()):
        self.fail_patterns = [re.compile(p) for p in spec.fail_patterns]
        self.stall_timeout = spec.stall_timeout
        self.stall_repeats = spec.stall_repeats
        # The agent's own answers first: they are the more specific.
        self.answers = [Answer(expect, send.encode("utf-8", "surrogateescape"))
                        for expect, send in (*answers, *spec.answers)]
        self.searcher = searcher_re([re.compile(a.expect) for a in self.answers]) if self.answers else None
        self.question = re.compile(spec.question) if spec.question else None
        self.question_after = spec.question_after
        self.reset(0.0)

    def reset(self, now: float) -> None:
        """A new task's CLI started at `now`."""
        self.last_output_at = now
        self.line = b""            # the line being printed (no newline yet), its last LINE_BYTES
        self.last_line = b""       # the last complete line
        self.line_no = 0           # grows with each line: which line an answer went to
        self.answered_line = -1
        self.answers_sent = 0
        self.repeated = b""        # the line repeating (cleaned), and in how many batches in a row
        self.repeated_raw: bytes | None = None
        self.repeats = 0
        self.asking = ""           # the question shown while the CLI is silent on it
        self.looked = False        # the silence since the last output was looked at for a question

    # --- per batch ---------------------------------------------------------------------------
    def feed(self, chunks: list[bytes], now: float) -> tuple[Notice, ...]:
        """A batch of output (as the pump took it); what to do about it."""
        self.last_output_at = now
        notices: tuple[Notice, ...] = (RESUMED,) if self.asking else ()
        self.asking, self.looked = "", False
        # The batch's end: its last TAIL_BYTES, from as few reads as hold them (usually the last).
        first, size = last_holding(chunks, TAIL_BYTES)
        text = chunks[-1] if first == len(chunks) - 1 else b"".join(chunks[first:])
        whole = first == 0 and size <= TAIL_BYTES  # a few lines that came together: each is looked at
        text = self.line + text if whole else text[-TAIL_BYTES:]  # (cut: its first line is not whole)
        if b"\n" in text:
            lines = text.split(b"\n")
            self.line = lines.pop()[-LINE_BYTES:]
            self.last_line = lines[-1][-LINE_BYTES:]
            self.line_no += len(lines)
            if self.stall_repeats:
                if whole:
                    stalled = self._count_repeats(lines)
                    if stalled:
                        notices += (stalled,)
                else:  # flat-out output: not a CLI stuck retrying
                    self.repeats = 0
        else:
            self.line = text[-LINE_BYTES:]
        if self.searcher is not None and self.answers_sent < MAX_ANSWERS:
            answer = self._answer()
            if answer is not None:
                notices += (answer,)
        return notices

    def _count_repeats(self, lines: list[bytes]) -> Notice | None:
        """The same (non-blank) line, batch after batch with nothing else: a retry loop. It is
        counted once per batch, so a CLI printing a run of equal lines at once is not stuck."""
        seen = False
        for raw in lines:
            if raw != self.repeated_raw:  # (the common case in a loop: byte for byte the same)
                text = clean_line(raw).strip()
                if not text:
                    continue
                self.repeated_raw = raw
                if text != self.repeated:
                    self.repeated, self.repeats = text, 0
            seen = True
        if not seen:
            return None
        self.repeats += 1
        if self.repeats < self.stall_repeats:
            return None
        self.repeats = 0
        return Notice("stalled", f"the same line {self.stall_repeats} times: {shown(self.repeated)}")

    def _last_shown(self) -> tuple[str, int]:
        """The last line shown on the terminal (the one being printed, else the last complete one),
        cleaned (whole), and its number."""
        text = cleaned(self.line)
        if text:
            return text, self.line_no
        return cleaned(self.last_line), self.line_no - 1

    def _answer(self) -> Notice | None:
        """Each prompt line is answered once. (A line redrawn in place, as a TUI does, stays one
        line here: looking at it again would type the answer again, into whatever it asks next.
        A program asking again after an answer does so on a new line: the terminal echoes the
        answer and its Enter.)"""
        text, number = self._last_shown()
        if not text or number == self.answered_line:
            return None
        index = self.searcher.search(text, len(text))
        if index < 0:
            return None
        self.answered_line = number
        self.answers_sent += 1
        return Notice("answer", cut(text, keep_end=True), self.answers[index])

    # --- at the pump's deadlines -------------------------------------------------------------
    def deadline(self) -> float | None:
        """When check() has something to look at next (None: only when output comes)."""
        times = []
        if self.stall_timeout:
            times.append(self.last_output_at + self.stall_timeout)
        if self.question is not None and not self.looked:
            times.append(self.last_output_at + self.question_after)
        return min(times) if times else None

    def check(self, now: float) -> Notice | None:
        """Silence: stalled past stall_timeout; a question on the last line, unanswered past question_after."""
        silent = now - self.last_output_at
        if self.stall_timeout and silent >= self.stall_timeout:
            return Notice("stalled", f"no output for {self.stall_timeout:g}s")
        if self.question is None or self.looked or silent < self.question_after:
            return None
        self.looked = True
        text, _number = self._last_shown()
        if not text or not self.question.search(text):
            return None
        self.asking = cut(text, keep_end=True)
        return Notice("waiting", self.asking)

    def failure(self, tail: bytes) -> str:
        """The line that fails a task whose CLI exited (see failure_line)."""
        return failure_line(tail, self.fail_patterns)
