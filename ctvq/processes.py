"""Which process owns something on disk: this host's short name and whether a pid on it is alive.

Temporary folders of atomic writes and the training run lock are tagged with host and pid, so a later
process can tell a live owner from one that was killed (only on the same host: a pid means nothing
elsewhere).
"""

from __future__ import annotations

import os
import socket


def host_name() -> str:
    """This host's name up to the first dot (the same on every node-local view of a cluster name)."""
    return socket.gethostname().split(".")[0]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as alive until reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


__all__ = ["host_name", "pid_alive"]
