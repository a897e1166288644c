from pathlib import Path

from edge_agent.config import TrainWindow
from edge_agent.train_window import DeviceReadings, may_train, read_device


def _supply(root: Path, name: str, **files: str) -> None:
    (root / name).mkdir(parents=True)
    for key, value in files.items():
        (root / name / key).write_text(value + "\n")


def test_rules():
    charging_only = TrainWindow(only_when_charging=True, max_load_per_core=0.5)
    assert may_train(charging_only, DeviceReadings(on_mains=True, load_per_core=0.1)) == (True, "")
    allowed, reason = may_train(charging_only, DeviceReadings(on_mains=False, load_per_core=0.1))
    assert not allowed and "battery" in reason
    allowed, reason = may_train(charging_only, DeviceReadings(on_mains=True, load_per_core=0.9))
    assert not allowed and "busy" in reason
    # What the platform cannot tell does not block training.
    assert may_train(charging_only, DeviceReadings(on_mains=None, load_per_core=None))[0]
    assert may_train(TrainWindow(), DeviceReadings(on_mains=False, load_per_core=50.0))[0]


def test_power_readings_from_sysfs(tmp_path):
    assert read_device(tmp_path / "missing").on_mains is None
    phone = tmp_path / "phone"
    _supply(phone, "battery", type="Battery", status="Discharging")
    _supply(phone, "usb", type="USB", online="0")
    assert read_device(phone).on_mains is False
    (phone / "usb" / "online").write_text("1\n")
    assert read_device(phone).on_mains is True
    laptop = tmp_path / "laptop"
    _supply(laptop, "BAT0", type="Battery", status="Charging")
    assert read_device(laptop).on_mains is True
