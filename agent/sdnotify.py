"""systemd's notify protocol (sd_notify(3)), without libsystemd.

With ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC``. The agent sends ``READY=1`` once its
probes, MQTT link and backend are set up, ``WATCHDOG=1`` from its main loop (so a hung main
loop stops the pings and systemd restarts it), and ``STOPPING=1`` on shutdown. Outside systemd
every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

logger = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        logger.warning("sd_notify(%s) failed: %s", state, exc)
        return False
    return True


def watchdog_interval_s() -> float | None:
    """Half the configured watchdog timeout (systemd's advice), or None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.1, int(usec) / 2e6)
    except ValueError:
        return None


def reloading_message() -> str:
    """``RELOADING=1`` with the ``MONOTONIC_USEC=`` systemd wants with it (sd_notify(3)).

    systemd uses the timestamp to tell this reload from an earlier one; CLOCK_MONOTONIC in
    microseconds, the clock it reads itself.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return f"RELOADING=1\nMONOTONIC_USEC={usec}"
