"""`tt attach`'s wire protocol between a viewer (the user's terminal) and a runner's attach server.

Frames both ways: 1 byte kind + 4 bytes big-endian length + payload.
  viewer -> runner: H hello (JSON: mode, rows, cols), I keystrokes, W window size (JSON)
  runner -> viewer: O output bytes, S state (JSON: state, task, reason, dropped)
"""
from __future__ import annotations

import json
import struct

FRAME = struct.Struct("!cI")
MAX_FRAME = 1024 * 1024


def frame(kind: bytes, payload: bytes) -> bytes:
    return FRAME.pack(kind, len(payload)) + payload


class FrameReader:
    """Splits a byte stream into (kind, payload) frames; ValueError on a frame too large."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self.buf += data
        frames = []
        while len(self.buf) >= FRAME.size:
            kind, size = FRAME.unpack_from(self.buf)
            if size > MAX_FRAME:
                raise ValueError("frame too large")
            if len(self.buf) < FRAME.size + size:
                break
            frames.append((kind, bytes(self.buf[FRAME.size:FRAME.size + size])))
            del self.buf[:FRAME.size + size]
        return frames


def parse_json(payload: bytes) -> dict:
    try:
        value = json.loads(payload)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
