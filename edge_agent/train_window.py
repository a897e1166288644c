"""Whether the device may train now: on mains power and idle enough, where the platform says.

The decision is a pure function of readings; the readings come from Linux sysfs
(/sys/class/power_supply) and the load average. A reading the platform cannot give is None,
and a condition that cannot be checked does not block training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edge_agent.config import TrainWindow

POWER_SUPPLY = Path("/sys/class/power_supply")


@dataclass
class DeviceReadings:
    on_mains: bool | None  # None: no battery/charger information
    load_per_core: float | None


def may_train(window: TrainWindow, readings: DeviceReadings) -> tuple[bool, str]:
    """(allowed, reason when not)."""
    if window.only_when_charging and readings.on_mains is False:
        return False, "on battery (profile trains only when charging)"
    limit = window.max_load_per_core
    if limit is not None and readings.load_per_core is not None and readings.load_per_core > limit:
        return False, f"busy (load {readings.load_per_core:.2f} per core > {limit})"
    return True, ""


def read_device(power_supply: Path = POWER_SUPPLY) -> DeviceReadings:
    return DeviceReadings(on_mains=_on_mains(power_supply), load_per_core=_load_per_core())


def _on_mains(root: Path) -> bool | None:
    """True if a charger is online or a battery charges, False if supplies report neither, None if none report."""
    supplies = [s for s in root.iterdir() if (s / "type").exists()] if root.is_dir() else []
    if not supplies:
        return None
    return any(_powered(s) for s in supplies)


def _powered(supply: Path) -> bool:
    kind = _read(supply / "type")
    if kind in ("Mains", "USB", "USB_C", "USB_PD"):
        return _read(supply / "online") == "1"
    return kind == "Battery" and _read(supply / "status") in ("Charging", "Full")


def _load_per_core() -> float | None:
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
