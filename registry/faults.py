"""Fault injection for crash tests.

``PEM_FAULT=<point>`` makes the process kill itself with SIGKILL when it reaches that point,
the way a power cut or an OOM kill would stop it. Unset (always, outside tests), a point
costs one dictionary lookup. The points:

=====================  =================================================================
``blob-written``       the blob's temporary file is written and fsynced, not yet renamed
``blob-stored``        the blob is in place under its digest, its row not yet committed
``row-flushed``        the module row is flushed inside its transaction, not committed
``compose-layer``      a composition has written its first layer to the temporary blob
``pull-downloaded``    a pull has downloaded its files, nothing stored yet
=====================  =================================================================
"""

from __future__ import annotations

import os
import signal

ENV_FAULT = "PEM_FAULT"


def point(name: str) -> None:
    if os.environ.get(ENV_FAULT) == name:
        os.kill(os.getpid(), signal.SIGKILL)
