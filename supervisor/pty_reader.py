"""A CLI's output, read from its pty by a thread of its own with blocking reads.

Why a thread: a pty hands output over 4 KiB at a time, and how the reader waits sets the rate. A
loop that select()s before each read, as a single-threaded pump must to also hear signals and
timers, moved ~70 MB/s on a 2-core machine; blocking reads ~100-130 MB/s (a poll that finds the
pty empty first waits for the kernel's flush worker and then sleeps; a blocking read sleeps once).
The runner's main thread keeps everything else, and is woken through a pipe when output waits.

The thread reads its own dup of the master side, so it can outlive the session: when a helper
that left the CLI's session still holds the terminal after the CLI is gone, the runner moves on
and the thread ends (closing its fd) at the helper's next write or exit.
"""
from __future__ import annotations

import os
import threading

READ_CHUNK = 65536


class PtyReader(threading.Thread):
    def __init__(self, master_fd: int):
        super().__init__(name="pty-reader", daemon=True)
        self.fd = os.dup(master_fd)  # (close-on-exec, as dup makes it)
        self.lock = threading.Lock()
        self.chunks: list[bytes] = []
        self.eof = False
        self.abandoned = False
        self.notify_r, self.notify_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def run(self) -> None:
        while True:
            try:
                data = os.read(self.fd, READ_CHUNK)
            except OSError:  # EIO: every holder of the terminal has closed it
                data = b""
            with self.lock:
                if self.abandoned:
                    break
                wake = not self.chunks
                if data:
                    self.chunks.append(data)
                else:
                    self.eof = True
            if wake:
                try:
                    os.write(self.notify_w, b"x")
                except OSError:  # the pipe is full: the runner is awake anyway
                    pass
            if not data:
                break
        self._close()

    def take(self) -> tuple[list[bytes], bool]:
        """The output read since the last call, and whether the terminal has closed."""
        try:
            while os.read(self.notify_r, 512):
                pass
        except OSError:  # empty
            pass
        with self.lock:
            chunks, self.chunks = self.chunks, []
            return chunks, self.eof

    def abandon(self) -> None:
        """The runner is done with this output: end now if the terminal closed, else at the next
        read that returns."""
        with self.lock:
            self.abandoned = True
            done = self.eof
        os.close(self.notify_r)
        if done:
            self.join()

    def _close(self) -> None:
        os.close(self.fd)
        os.close(self.notify_w)
