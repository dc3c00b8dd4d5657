"""RQ's side of the benchmark. Runs in the benchmark's own venv (never the project's).

  rq_peer.py dispatch   --redis-server BIN --dir D --samples N
      one forking rq Worker; enqueue -> the job function running in the work horse, N times (ms)
  rq_peer.py throughput --redis-server BIN --dir D --jobs N --workers W --reps R
      W forking Workers; N trivial jobs enqueued, until all finished (jobs/s), R times
  rq_peer.py release    --redis-server BIN --dir D --samples N
      one forking rq Worker; job A (held on a gate) and job B enqueued with depends_on=A; A's
      ended_at -> B running in the work horse, N times (ms)
  rq_peer.py worker SOCKET QUEUE   (internal: one worker process)

It starts its own redis-server (the same binary as the town's) on a unix socket in D, and prints
one JSON line with the samples.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from redis import Redis  # noqa: E402
from rq import Queue, Worker  # noqa: E402

import rq_jobs  # noqa: E402


def start_redis(binary: str, folder: str):
    sock = os.path.join(folder, "redis.sock")
    proc = subprocess.Popen([binary, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700",
                             "--save", "", "--appendonly", "no", "--dir", folder, "--loglevel", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            r = Redis(unix_socket_path=sock)
            r.ping()
            return proc, sock, r
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def start_workers(sock: str, queue: str, n: int, r: Redis) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", sock, queue],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]
    deadline = time.monotonic() + 30
    while len(Worker.all(connection=r)) < n:
        if time.monotonic() > deadline:
            raise RuntimeError("rq workers did not register")
        time.sleep(0.01)
    # a registered worker is about to block in its dequeue; give it a moment to get there
    time.sleep(0.2)
    return procs


def stop(procs, redis_proc) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
    redis_proc.terminate()
    redis_proc.wait(10)


def dispatch(args) -> dict:
    redis_proc, sock, r = start_redis(args.redis_server, args.dir)
    procs = start_workers(sock, "bench", 1, r)
    fifo = os.path.join(args.dir, "marks")
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    q = Queue("bench", connection=r)
    samples = []
    try:
        for i in range(args.samples):
            token = f"{i}\n"
            t0 = time.monotonic()
            job = q.enqueue(rq_jobs.mark, fifo, token)
            got = b""
            while not got.endswith(b"\n"):
                ready, _, _ = select.select([fd], [], [], 30)
                if not ready:
                    raise RuntimeError("rq job did not start within 30 s")
                got += os.read(fd, 4096)
            samples.append((time.monotonic() - t0) * 1000)
            deadline = time.monotonic() + 30
            while job.get_status(refresh=True) not in ("finished", "failed"):
                if time.monotonic() > deadline:
                    raise RuntimeError("rq job did not finish")
                time.sleep(0.002)
            time.sleep(0.02)  # the worker is back in its dequeue
    finally:
        stop(procs, redis_proc)
    return {"samples_ms": samples}


def release(args) -> dict:
    redis_proc, sock, r = start_redis(args.redis_server, args.dir)
    procs = start_workers(sock, "bench", 1, r)
    fifo, gate = os.path.join(args.dir, "marks"), os.path.join(args.dir, "gate")
    os.mkfifo(fifo)
    os.mkfifo(gate)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    gate_fd = os.open(gate, os.O_RDWR | os.O_NONBLOCK)
    q = Queue("bench", connection=r)
    samples = []
    try:
        for i in range(args.samples):
            first = q.enqueue(rq_jobs.gate, gate)
            second = q.enqueue(rq_jobs.mark, fifo, f"{i}\n", depends_on=first)
            os.write(gate_fd, b"go\n")
            got = b""
            while not got.endswith(b"\n"):
                ready, _, _ = select.select([fd], [], [], 30)
                if not ready:
                    raise RuntimeError("rq dependent job did not start within 30 s")
                got += os.read(fd, 4096)
            t1 = time.time()
            first.refresh()
            ended = first.ended_at.replace(tzinfo=first.ended_at.tzinfo or __import__("datetime").timezone.utc)
            samples.append((t1 - ended.timestamp()) * 1000)
            deadline = time.monotonic() + 30
            while second.get_status(refresh=True) not in ("finished", "failed"):
                if time.monotonic() > deadline:
                    raise RuntimeError("rq job did not finish")
                time.sleep(0.002)
            time.sleep(0.02)
    finally:
        stop(procs, redis_proc)
    return {"samples_ms": samples}


def throughput(args) -> dict:
    redis_proc, sock, r = start_redis(args.redis_server, args.dir)
    procs = start_workers(sock, "bench", args.workers, r)
    q = Queue("bench", connection=r)
    samples = []
    try:
        for rep in range(args.reps):
            registry = q.finished_job_registry
            before = registry.count
            t0 = time.monotonic()
            with r.pipeline() as pipe:
                q.enqueue_many([Queue.prepare_data(rq_jobs.noop) for _ in range(args.jobs)], pipeline=pipe)
                pipe.execute()
            deadline = time.monotonic() + 300
            while registry.count - before < args.jobs:
                if time.monotonic() > deadline:
                    raise RuntimeError("rq jobs did not finish")
                time.sleep(0.005)
            samples.append(args.jobs / (time.monotonic() - t0))
            time.sleep(0.1)
    finally:
        stop(procs, redis_proc)
    return {"samples_per_s": samples}


def worker(sock: str, queue: str) -> None:
    r = Redis(unix_socket_path=sock)
    Worker([Queue(queue, connection=r)], connection=r).work(logging_level="WARNING")


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2], sys.argv[3])
        return
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("dispatch", "release", "throughput"))
    p.add_argument("--redis-server", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    result = {"dispatch": dispatch, "release": release, "throughput": throughput}[args.mode](args)
    import rq
    result["rq"] = rq.__version__
    print(json.dumps(result))


if __name__ == "__main__":
    main()
