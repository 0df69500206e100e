"""Who and what this device is: hardware identity and provenance for records.

Reads, all below an injectable root:

- ``/proc/device-tree/model`` (Raspberry Pi, Jetson: NUL-terminated board name),
- ``/etc/nv_tegra_release`` (Jetson L4T release line, e.g. ``# R35 (release), REVISION: 4.1``),
- ``/sys/class/dmi/id/{sys_vendor,product_name}`` (x86 boards),
- ``/proc/cpuinfo`` (``model name`` on x86, ``Model``/``Hardware`` on Arm),
- cpufreq ``scaling_governor`` of cpu0.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
from typing import Any

from probes.base import SysfsReader


def hardware_identity(root: str | os.PathLike[str] = "/") -> dict[str, Any]:
    """Describe the board, CPU and OS; unknown fields are None, never guessed."""
    fs = SysfsReader(root)
    model = fs.read_text("/proc/device-tree/model")
    if model is not None:
        model = model.replace("\x00", "").strip() or None
    if model is None:
        vendor = fs.read_text("/sys/class/dmi/id/sys_vendor")
        product = fs.read_text("/sys/class/dmi/id/product_name")
        model = " ".join(p for p in (vendor, product) if p) or None
    cpu_model = None
    cpuinfo = fs.read_text("/proc/cpuinfo") or ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and value.strip():
            cpu_model = value.strip()
            break
    tegra = fs.read_text("/etc/nv_tegra_release")
    return {
        "hostname": socket.gethostname(),
        "board_model": model,
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "os": _os_release(fs),
        "l4t_release": tegra.splitlines()[0].lstrip("# ").strip() if tegra else None,
        "governor": fs.read_text("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "python": sys.version.split()[0],
    }


def _os_release(fs: SysfsReader) -> str | None:
    text = fs.read_text("/etc/os-release")
    if not text:
        return None
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return None
