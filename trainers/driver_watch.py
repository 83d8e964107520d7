"""Training workers end when the `cafe` process that launched them is gone. A driver killed
outright (SIGKILL, an OOM kill) leaves the Ray it started in-process running for a while, and its
workers would go on training and writing checkpoints that no run will ever register."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

LOG = logging.getLogger("cafe.train")
POLL_SECONDS = 2.0


def driver_identity() -> dict:
    """What a worker needs to watch this process: its host and pid."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user: never take it for gone
        return True
    return True


def stop_with_driver(driver: dict) -> None:
    """On the driver's host, a daemon thread ends this worker process once the driver is gone.
    On other hosts Ray's job ownership ends the workers (the driver's pid means nothing there)."""
    if driver["host"] != socket.gethostname():
        return

    def watch() -> None:
        while pid_alive(driver["pid"]):
            time.sleep(POLL_SECONDS)
        LOG.warning(f"[train] the driver (pid {driver['pid']}) is gone: this worker stops; relaunch the same "
                    "command to resume from the last registered checkpoint")
        logging.shutdown()
        os._exit(1)

    threading.Thread(target=watch, name="cafe-driver-watch", daemon=True).start()
