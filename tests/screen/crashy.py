"""A screen worker whose process is killed (SIGKILL, as the out-of-memory killer does) when it is
handed an adapter whose name starts with "crash"; otherwise the real worker. Importable by the
spawned worker processes of ``LocalEngine``."""

from __future__ import annotations

import os
import signal

from lora_audit.screen.engines import _serve


class _Tripwire:
    def __init__(self, conn):
        self.conn = conn

    def recv(self):
        msg = self.conn.recv()
        if msg is not None and msg[0].adapter.startswith("crash"):
            os.kill(os.getpid(), signal.SIGKILL)
        return msg

    def send(self, obj):
        self.conn.send(obj)


def serve(conn, spec, device, threads):
    _serve(_Tripwire(conn), spec, device, threads)
