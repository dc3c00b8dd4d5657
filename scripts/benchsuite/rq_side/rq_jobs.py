"""The jobs RQ runs in the benchmark (imported by the forking worker's work horse)."""
import os


def mark(path: str, token: str) -> None:
    """Tell the benchmark this job has started: write a token into its FIFO."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, token.encode())
    finally:
        os.close(fd)


def noop() -> None:
    """A trivial job, the counterpart of /bin/true as an agent's CLI."""
    return None


def gate(path: str) -> None:
    """Wait for the benchmark to let this job finish: one line from its FIFO."""
    with open(path, "rb") as fh:
        fh.readline()
