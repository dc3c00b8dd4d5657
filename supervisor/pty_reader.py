"""A CLI's output, read from its pty by a thread of its own with blocking reads.

Why a thread: a pty hands output over 4 KiB at a time, and how the reader waits sets the rate. A
loop that select()s before each read, as a single-threaded pump must to also hear signals and
timers, moved ~70 MB/s on a 2-core machine; blocking reads ~100-130 MB/s (a poll that finds the
pty empty first waits for the kernel's flush worker and then sleeps; a blocking read sleeps once).
The runner's main thread keeps everything else, and is woken through a pipe when output waits.

The thread also writes the output to the agent's log itself (the sink go() hands it), before
the main thread sees it: the copy every byte takes is made where the byte arrives, and the log
stays current while the main thread is held up. A flood moved 119-123 MB/s so against 113-118
with the main thread writing batches (three alternating rounds of six 100 MB tasks). It writes
in blocks, not a write per read: a flood comes a full pty buffer (~4 KiB) a read, and a write
each was half the runner's system calls (25 000 per 100 MB; now ~3 000). A read short of a full
buffer (SMALL_READ: the pty was drained, the CLI paused: a line, a prompt, a burst's end) goes
at once with what came before it; so do LOG_BLOCK bytes, and take() and a full queue write what
is left. Only output that ends exactly at a full read, with the main thread held up, waits in
memory for the next read or take() (10 alternated rounds of 100 MB: 0.72 of the bare loop's rate
against 0.64, with a 1 KiB SMALL_READ).
The thread starts before the task is recorded running (a thread that cannot be had fails the
task before that) and reads at once, but the log gets nothing before go(), which writes what was
read until then: the log's "task started" line comes before the CLI's output, and a CLI that
prints at once is not held up meanwhile. A line the runner notes mid-task (an answer typed, a
stall) comes after the batch that prompted it, which take() has written to the log first.

At most QUEUE_BYTES wait between the two: past that the thread stops reading, the pty fills and
the CLI waits, as it would for any slow reader, rather than the runner's memory growing while
its main thread is held up (a stalled Redis, a slow disk). The bound is also the largest batch
the main thread takes at once: with 256 KiB the rate was ~20 % lower than with 4 MiB here, and
8 MiB lets a flood's batches gather 50 ms (runner.FLOOD_BATCH_SECONDS) at its pty's rate.

The thread reads its own dup of the master side. When the runner is done with a session whose
terminal is still held open (by a helper that left the CLI's session), abandon() writes a byte
into the terminal to end the thread's read, so the thread closes its dup and the master's close
hangs the terminal up, as it would without the thread.
"""
from __future__ import annotations

import fcntl
import os
import threading
import traceback
from typing import Callable

from .procutil import drain

READ_CHUNK = 65536
LOG_BLOCK = 64 * 1024    # the most read output waits for the log (see above)
SMALL_READ = 4000        # a read short of a full pty buffer (4 KiB): the pty was drained, it goes at once
QUEUE_BYTES = 8 * 1024 * 1024
_TIOCGPTPEER = 0x5441  # (termios does not name it): an fd for the slave side of a pty master


class PtyReader(threading.Thread):
    def __init__(self, master_fd: int):
        super().__init__(name="pty-reader", daemon=True)
        self.master_fd = master_fd
        self.notify_r, self.notify_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.fd = os.dup(master_fd)  # (close-on-exec, as dup makes it)
        except OSError:
            os.close(self.notify_r)
            os.close(self.notify_w)
            raise
        self.sink: Callable[[bytes], None] | None = None  # the log's writer, from go() on (this thread's)
        self.lock = threading.Lock()
        self.room = threading.Condition(self.lock)  # notified when take() empties the queue
        self.chunks: list[bytes] = []
        self.unlogged = bytearray()  # read, for the sink, not yet given to it (see LOG_BLOCK)
        self.size = 0
        self.eof = False
        self.abandoned = False

    def go(self, sink: Callable[[bytes], None]) -> None:
        """From now on each read goes to `sink` (on the thread, in order) before take() sees it;
        what was read before goes to it now."""
        with self.lock:
            self.sink = sink
            self.unlogged += b"".join(self.chunks)
            self._log_unlogged()

    def _log_unlogged(self) -> None:
        """What the sink has not had yet, to it now (under the lock)."""
        if self.unlogged and self.sink is not None:
            self._log(bytes(self.unlogged))
        self.unlogged.clear()

    def _log(self, data: bytes) -> None:
        """`data` to the sink (under the lock). An exception other than OSError there (a bug, no
        memory) ends the log's copy, not the thread: the task and the stream keep the output, and
        why is on stderr (which is the log)."""
        try:
            self.sink(data)
        except Exception:
            self.sink = None
            traceback.print_exc()

    def run(self) -> None:
        # (the loop runs once per pty read, ~5 KiB: what it looks up is looked up once)
        read, fd, lock, chunks, unlogged = os.read, self.fd, self.lock, self.chunks, self.unlogged
        while not self.abandoned:
            if self.size >= QUEUE_BYTES:  # full: the CLI waits, not the runner's memory grows
                with lock:
                    self._log_unlogged()  # (the log stays current while the main thread is held up)
                    while self.size >= QUEUE_BYTES and not self.abandoned:
                        self.room.wait()
                if self.abandoned:
                    break
            try:
                data = read(fd, READ_CHUNK)
            except OSError:  # EIO: every holder of the terminal has closed it
                data = b""
            with lock:  # (held while the sink writes: nothing reaches the log after abandon())
                if self.abandoned:
                    break
                wake = not chunks
                if data:
                    if self.sink is not None:
                        unlogged += data
                        if len(data) < SMALL_READ or len(unlogged) >= LOG_BLOCK:
                            self._log_unlogged()
                    chunks.append(data)
                    self.size += len(data)
                else:
                    self.eof = True
                    self._log_unlogged()
            if wake:
                try:
                    os.write(self.notify_w, b"x")
                except OSError:  # the pipe is full: the runner is awake anyway
                    pass
            if not data:
                break
        os.close(fd)
        os.close(self.notify_w)

    def take(self) -> tuple[list[bytes], bool]:
        """The output read since the last call, and whether the terminal has closed."""
        drain(self.notify_r)
        with self.lock:
            self._log_unlogged()  # (what the runner has, the log has: its notes come after it)
            chunks = self.chunks.copy()
            self.chunks.clear()
            self.size = 0
            self.room.notify()
            return chunks, self.eof

    def abandon(self) -> None:
        """The runner is done with this output (call before closing the master side)."""
        with self.lock:
            self._log_unlogged()
            self.abandoned = True
            done = self.eof
            self.room.notify()
        os.close(self.notify_r)
        if not done:
            self._wake_read()
        self.join(1.0)

    def release(self) -> None:
        """The fds of a reader whose thread never started."""
        for fd in (self.fd, self.notify_r, self.notify_w):
            os.close(fd)

    def _wake_read(self) -> None:
        """End a read blocked on a terminal someone still holds: one byte from its slave side."""
        try:
            slave = fcntl.ioctl(self.master_fd, _TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # a kernel before 4.13: the thread ends at the holder's next write or exit
            return
        try:
            os.write(slave, b"\0")
        except OSError:  # full: then the thread is not blocked in a read
            pass
        finally:
            os.close(slave)
