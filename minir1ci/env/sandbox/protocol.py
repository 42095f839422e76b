"""What the sandbox's processes agree on (client.py, server.py, child.py): the server's environment, the
length-prefixed JSON frames of requests and results, the slot init's report. Stdlib only: the server
runs with `python -I`."""
from __future__ import annotations

import json
import os
import struct

# The server's whole environment, which executions inherit: no trainer secrets. BLAS pools of one
# thread: fork copies only the calling thread, and a pool of one never starts another.
USER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "TMPDIR": "/tmp", "HOME": "/tmp",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STATUS = struct.Struct("<id")  # slot init -> server, per execution: its wait status, the CPU seconds it used


def read_frame(fd: int) -> dict | None:
    """Blocking read of one frame (a 4-byte big-endian length, then JSON); None at EOF."""
    buf, need = b"", 4
    while len(buf) < need:
        chunk = os.read(fd, need - len(buf))
        if not chunk:
            return None
        buf += chunk
        if len(buf) == 4 == need:
            buf, need = b"", struct.unpack(">I", buf)[0]
    return json.loads(buf)


def write_frame(fd: int, obj: dict) -> None:
    data = json.dumps(obj).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def pop_frames(buf: bytearray) -> list[dict]:
    """The complete frames at the front of `buf` (bytes read without blocking), removed from it."""
    frames = []
    while len(buf) >= 4 and len(buf) >= 4 + (n := struct.unpack(">I", buf[:4])[0]):
        frames.append(json.loads(buf[4:4 + n]))
        del buf[:4 + n]
    return frames
