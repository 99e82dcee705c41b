"""Fault injection for crash and race tests.

``PEM_FAULT=<point>`` makes the process kill itself with SIGKILL when it reaches that point,
the way a power cut or an OOM kill would stop it. ``PEM_FAULT=<point>:stop`` makes it stop
itself with SIGSTOP instead, so that a test knows the exact moment (``waitpid`` with
``WUNTRACED`` returns), does something concurrently, and resumes it with SIGCONT. Unset
(always, outside tests), a point costs one dictionary lookup. The points:

=====================  =================================================================
``blob-written``       the blob's temporary file is written and fsynced, not yet renamed
``blob-stored``        the blob is in place under its digest, its row not yet committed
``row-flushed``        the module row is flushed inside its transaction, not committed
``compose-layer``      a composition has written its first layer to the temporary blob
``pull-downloaded``    a pull has downloaded its files, nothing stored yet
``idempotent-applied`` a server committed a write with its idempotency key and answer, not yet sent
=====================  =================================================================
"""

from __future__ import annotations

import os
import signal

ENV_FAULT = "PEM_FAULT"
STOP_SUFFIX = ":stop"


def point(name: str) -> None:
    fault = os.environ.get(ENV_FAULT)
    if fault == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == name + STOP_SUFFIX:
        os.kill(os.getpid(), signal.SIGSTOP)
