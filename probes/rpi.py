"""Raspberry Pi throttling, SoC temperature and (Pi 5) PMIC rail power.

Sources (files below the injectable root; commands through an injectable runner)::

    /proc/device-tree/model                               "Raspberry Pi 5 Model B Rev 1.0"
    /sys/devices/platform/soc/soc:firmware/get_throttled  hex without "0x" ("50005"), from the
                                                          raspberrypi firmware driver; removed
                                                          on recent kernels
    vcgencmd get_throttled                                "throttled=0x50005" (fallback)
    /sys/class/thermal/thermal_zone0/temp                 SoC temperature, milli-degrees C
    vcgencmd pmic_read_adc                                Pi 5 only, lines such as
                                                          "VDD_CORE_A current(7)=0.81262990A"
                                                          "VDD_CORE_V volt(15)=0.88187950V"

``get_throttled`` bits (Raspberry Pi documentation, "vcgencmd get_throttled"): 0 under-voltage
now, 1 ARM frequency capped now, 2 throttled now, 3 soft temperature limit now; 16-19 the same
conditions have occurred since boot.

PMIC power pairs each ``<RAIL>_A`` current with the ``<RAIL>_V`` voltage of the same rail
(W = V * A). ``EXT5V_V`` has no current channel, so it is reported as the input voltage only.
The sum of the rails is the power leaving the PMIC: it excludes the PMIC's conversion losses
and whatever the 5 V input feeds directly (USB ports, fan), so it is a lower bound on the board
input; it is published as the ``rpi5-pmic:rails_sum`` board source for want of a better one
(a metered plug, ``mqtt_power``, measures the wall).

vcgencmd runs as a subprocess through ``runner`` so tests replace it with canned outputs; it
needs the ``video`` group for /dev/vcio.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from probes.base import Availability, PowerCoverage, PowerReading, Probe

logger = logging.getLogger(__name__)

Runner = Callable[[Sequence[str]], "str | None"]

THROTTLED_SYSFS = "/sys/devices/platform/soc/soc:firmware/get_throttled"
_PMIC_LINE = re.compile(r"^\s*(\S+)_([AV])\s+\w+\(\d+\)=([-+0-9.eE]+)[AV]\s*$")
_THROTTLED = re.compile(r"throttled=(0x[0-9a-fA-F]+)")


def run_command(argv: Sequence[str], timeout_s: float = 2.0) -> str | None:
    """Run ``argv`` and return stdout, or None when missing, failing or too slow."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("%s failed: %s", argv[0], exc)
        return None
    if proc.returncode != 0:
        logger.debug("%s exited %d: %s", argv[0], proc.returncode, proc.stderr.strip())
        return None
    return proc.stdout


@dataclass(frozen=True)
class PmicRail:
    """One PMIC rail (Pi 5).

    Attributes:
        voltage_v: Rail voltage, V.
        current_a: Rail current, A; None for a rail without a current channel (EXT5V).
        power_mw: voltage * current, mW.
    """

    voltage_v: float | None
    current_a: float | None
    power_mw: float | None


@dataclass(frozen=True)
class RpiReadings:
    """Raspberry Pi state.

    Attributes:
        model: ``/proc/device-tree/model``.
        throttled_raw: The ``get_throttled`` bit field; None when neither source answered.
        throttled_source: ``"sysfs"`` or ``"vcgencmd"``.
        under_voltage_now: Bit 0.
        freq_capped_now: Bit 1.
        throttled_now: Bit 2.
        soft_temp_limit_now: Bit 3.
        under_voltage_occurred: Bit 16.
        freq_capped_occurred: Bit 17.
        throttled_occurred: Bit 18.
        soft_temp_limit_occurred: Bit 19.
        soc_temp_c: thermal_zone0, degrees C.
        pmic_rails: Rail -> reading (Pi 5 only).
        pmic_total_mw: Sum of rails with a current channel, mW (Pi 5 only).
        input_voltage_v: ``EXT5V_V``, V (Pi 5 only).
    """

    model: str | None
    throttled_raw: int | None
    throttled_source: str | None
    under_voltage_now: bool | None
    freq_capped_now: bool | None
    throttled_now: bool | None
    soft_temp_limit_now: bool | None
    under_voltage_occurred: bool | None
    freq_capped_occurred: bool | None
    throttled_occurred: bool | None
    soft_temp_limit_occurred: bool | None
    soc_temp_c: float | None
    pmic_rails: dict[str, PmicRail]
    pmic_total_mw: float | None
    input_voltage_v: float | None


def parse_pmic_read_adc(text: str) -> dict[str, PmicRail]:
    """Pair ``X_A`` with ``X_V`` lines of ``vcgencmd pmic_read_adc``."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = _PMIC_LINE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        (amps if m.group(2) == "A" else volts)[m.group(1)] = value
    rails: dict[str, PmicRail] = {}
    for name in sorted(set(amps) | set(volts)):
        v, a = volts.get(name), amps.get(name)
        rails[name] = PmicRail(v, a, v * a * 1000.0 if v is not None and a is not None else None)
    return rails


def _bit(raw: int | None, n: int) -> bool | None:
    return None if raw is None else bool(raw >> n & 1)


class RpiProbe(Probe):
    """``get_throttled`` flags, SoC temperature and Pi 5 PMIC power.

    Args:
        root: Filesystem root (``/`` in production, a fixture tree in tests).
        runner: Runs a command and returns stdout or None (default: subprocess, 2 s timeout).
        vcgencmd: vcgencmd binary name or path.
        read_pmic: Read the PMIC ADC on a Pi 5 (one subprocess per sample).
    """

    name = "rpi"

    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        *,
        runner: Runner | None = None,
        vcgencmd: str = "vcgencmd",
        read_pmic: bool = True,
    ) -> None:
        super().__init__(root)
        self._run: Runner = runner or run_command
        self._vcgencmd = vcgencmd
        self._read_pmic = read_pmic

    def _model(self) -> str | None:
        text = self.fs.read_text("/proc/device-tree/model")
        return (text.rstrip("\x00").strip() or None) if text else None

    def _is_pi5(self, model: str | None) -> bool:
        return bool(model) and "Raspberry Pi 5" in (model or "")

    def check(self) -> Availability:
        """Available on a Raspberry Pi (device-tree model)."""
        model = self._model()
        if not model or "Raspberry Pi" not in model:
            return Availability(False, "not a Raspberry Pi (/proc/device-tree/model)")
        if self.fs.read_text(THROTTLED_SYSFS) is None and self._vc("get_throttled") is None:
            return Availability(
                True,
                "no throttling source: firmware get_throttled file absent and vcgencmd not "
                "runnable (install it, add the agent user to the 'video' group)",
                degraded=True,
            )
        return Availability(True)

    def _vc(self, *args: str) -> str | None:
        return self._run([self._vcgencmd, *args])

    def _throttled(self) -> tuple[int | None, str | None]:
        text = self.fs.read_text(THROTTLED_SYSFS)
        if text:
            try:
                return int(text, 16), "sysfs"
            except ValueError:
                logger.warning("malformed %s: %r", THROTTLED_SYSFS, text)
        out = self._vc("get_throttled")
        if out:
            m = _THROTTLED.search(out)
            if m:
                return int(m.group(1), 16), "vcgencmd"
            logger.warning("malformed vcgencmd get_throttled output: %r", out)
        return None, None

    def sample(self) -> RpiReadings:
        """Read throttling, SoC temperature and (Pi 5) the PMIC ADC."""
        model = self._model()
        raw, source = self._throttled()
        temp_mc = self.fs.read_int("/sys/class/thermal/thermal_zone0/temp")
        rails: dict[str, PmicRail] = {}
        if self._read_pmic and self._is_pi5(model):
            out = self._vc("pmic_read_adc")
            if out:
                rails = parse_pmic_read_adc(out)
        with_current = [r for r in rails.values() if r.current_a is not None]
        total: float | None = None
        if with_current and all(r.power_mw is not None for r in with_current):
            total = sum(r.power_mw for r in with_current if r.power_mw is not None)
        ext5v = rails.get("EXT5V")
        input_v: float | None = None
        if ext5v is not None and ext5v.current_a is None:
            input_v = ext5v.voltage_v
            del rails["EXT5V"]
        return RpiReadings(
            model=model,
            throttled_raw=raw,
            throttled_source=source,
            under_voltage_now=_bit(raw, 0),
            freq_capped_now=_bit(raw, 1),
            throttled_now=_bit(raw, 2),
            soft_temp_limit_now=_bit(raw, 3),
            under_voltage_occurred=_bit(raw, 16),
            freq_capped_occurred=_bit(raw, 17),
            throttled_occurred=_bit(raw, 18),
            soft_temp_limit_occurred=_bit(raw, 19),
            soc_temp_c=temp_mc / 1000.0 if temp_mc is not None else None,
            pmic_rails=rails,
            pmic_total_mw=total,
            input_voltage_v=input_v,
        )

    def power(self, readings: RpiReadings) -> list[PowerReading]:
        """The PMIC rail sum as the board source (Pi 5 only; see module docstring)."""
        if not readings.pmic_rails:
            return []
        return [
            PowerReading("rpi5-pmic:rails_sum", PowerCoverage.BOARD_INPUT, readings.pmic_total_mw)
        ]
