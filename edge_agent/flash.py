"""Build a device bundle: everything one device needs to join the fleet, and its installer.

Bundle layout (relocatable: agent.yaml's paths are relative to it), the same folder facefed-<device id>/ whether
--out names a folder (the bundle goes inside it) or a .tar.gz (the archive holds it):

    agent.yaml                  the merged agent config (profile, broker, TLS files, aggregator key)
    tls/ca.crt device.crt device.key    the fleet CA and this device's client certificate (key 0600)
    keys/aggregator-signing.pub         verifies every global model before it is loaded
    model/                      the current deployed model, if one was given
    faces/                      the owner's labelled faces go here (never leave the device)
    bank/                       with --camera-bank: the public face bank camera training needs (train.method camera)
    wheels/                     the facefed-edge wheel to install
    facefed-agent.service       systemd unit
    install.sh                  creates a venv, installs the profile's torch and the agent with the profile's extras,
                                and enables the unit (or, with --no-systemd, prints how to run the agent)
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import yaml

from edge_agent.config import CameraTrainingSettings, DeviceProfile, UnlockSettings
from fedwire.config import ConfigError, parse_config
from fedwire.pki_layout import aggregator_files, ca_files, device_files
from fedwire.topics import validate_device_id
from firmware_configs import profile_path
from model_zoo.camera_measure import MEASURED

# Inference runtime of the profile -> the extras the device installs.
BACKEND_EXTRAS = {"torch": "agent", "onnx": "agent,onnx", "tflite": "agent,tflite"}


class FlashError(Exception):
    """A bundle cannot be built as asked; the message says what is missing."""


@dataclass
class FlashRequest:
    profile: str
    device_id: str
    broker: str
    pki: Path
    out: Path  # a folder, or a file ending in .tar.gz
    topic_prefix: str = "facefed"
    model: Path | None = None
    wheel: Path | None = None  # default: build one from this source tree
    # A door or corridor camera (train.method camera): the public face bank to ship (aligned crops, a folder per
    # identity), what the device knows of its camera, and how many unlock frames per person it keeps to train on.
    camera_bank: Path | None = None
    camera: str = MEASURED
    keep_frames: int = 200


def build_bundle(request: FlashRequest) -> Path:
    """The .tar.gz, or the bundle folder inside --out; either way the device gets facefed-<id>/."""
    device_id = validate_device_id(request.device_id)
    path = profile_path(request.profile)
    try:
        profile = parse_config(DeviceProfile, yaml.safe_load(path.read_text()) or {}, source=str(path))
    except ConfigError as exc:
        raise FlashError(str(exc)) from None
    name = f"facefed-{device_id}"
    if request.out.name.endswith(".tar.gz"):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / name
            _write_bundle(request, device_id, profile, root)
            request.out.parent.mkdir(parents=True, exist_ok=True)
            with tarfile.open(request.out, "w:gz") as tar:
                tar.add(root, arcname=root.name)
        return request.out
    _write_bundle(request, device_id, profile, request.out / name)
    return request.out / name


def _write_bundle(request: FlashRequest, device_id: str, profile: DeviceProfile, root: Path) -> None:
    if root.exists() and any(root.iterdir()):
        raise FlashError(f"{root} is not empty")
    for sub in ("tls", "keys", "faces", "wheels", "model"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    _copy_credentials(request.pki, device_id, root)
    if request.camera_bank is not None:
        _copy_bank(request, root / "bank")
    if request.model is not None:
        _copy_model(request.model, root / "model")
    wheel = request.wheel or _build_wheel(root / "wheels")
    if request.wheel is not None:
        shutil.copy2(wheel, root / "wheels" / wheel.name)
    (root / "agent.yaml").write_text(_agent_yaml(request, device_id))
    (root / "facefed-agent.service").write_text(SYSTEMD_UNIT)
    script = INSTALL_SCRIPT.replace("@EXTRAS@", BACKEND_EXTRAS[profile.backend]).replace("@TORCH@", profile.torch)
    _write_executable(root / "install.sh", script)
    (root / "faces" / "README.txt").write_text(
        "Put this device's labelled faces here: one folder per person (faces/<name>/*.jpg).\n"
        "They are used for local training only and never leave the device.\n")


def _copy_credentials(pki: Path, device_id: str, root: Path) -> None:
    device = device_files(pki, device_id)
    sources = {
        root / "tls" / "ca.crt": ca_files(pki).cert,
        root / "tls" / "device.crt": device.cert,
        root / "tls" / "device.key": device.key,
        root / "keys" / "aggregator-signing.pub": aggregator_files(pki).signing_pub,
    }
    missing = [str(src) for src in sources.values() if not src.is_file()]
    if missing:
        raise FlashError(f"missing in the PKI: {', '.join(missing)} "
                         f"(run `facefed-aggregator ca init` and `facefed-aggregator provision {device_id}`)")
    for target, source in sources.items():
        shutil.copyfile(source, target)
        os.chmod(target, 0o600 if target.suffix == ".key" else 0o644)


def _copy_bank(request: FlashRequest, target: Path) -> None:
    """Ship the bank, once the camera settings pass the checks the agent's config makes at start."""
    options = {"bank": "--camera-bank", "camera": "--camera", "keep_frames": "--keep-frames"}
    try:
        CameraTrainingSettings(bank=request.camera_bank, camera=request.camera).check()
        UnlockSettings(keep_frames=request.keep_frames).check()
    except ConfigError as exc:
        raise FlashError(f"{options.get(exc.field, exc.field)}: {exc.reason}") from None
    shutil.copytree(request.camera_bank, target, dirs_exist_ok=True)


def _copy_model(model: Path, target: Path) -> None:
    if not model.is_file():
        raise FlashError(f"no such model file: {model}")
    shutil.copy2(model, target / model.name)
    sidecar = model.with_suffix(".json")
    if sidecar.is_file():
        shutil.copy2(sidecar, target / sidecar.name)


def _build_wheel(out_dir: Path) -> Path:
    source = Path(__file__).resolve().parents[1]
    if not (source / "pyproject.toml").is_file():
        raise FlashError("this installation has no source tree to build a wheel from: pass --wheel FILE")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out_dir), str(source)], check=True)
    wheels = sorted(out_dir.glob("facefed_edge-*.whl"))
    if not wheels:
        raise FlashError(f"pip built no facefed_edge wheel into {out_dir}")
    return wheels[-1]


def _agent_yaml(request: FlashRequest, device_id: str) -> str:
    config = {
        "device_id": device_id,
        "profile": request.profile,
        "broker": request.broker,
        "topic_prefix": request.topic_prefix,
        "data": "faces",
        "state_dir": "state",
        "aggregator_key": "keys/aggregator-signing.pub",
        "tls": {"ca_cert": "tls/ca.crt", "certfile": "tls/device.crt", "keyfile": "tls/device.key"},
    }
    if request.camera_bank is not None:  # camera training: it trains on the frames its unlocks keep
        config["data"] = "state/unlock/frames"
        config["unlock"] = {"keep_frames": request.keep_frames}
        config["camera_training"] = {"bank": "bank", "camera": request.camera}
    return "# Written by `facefed-agent flash`; paths are relative to this file.\n" + yaml.safe_dump(config, sort_keys=False)


def _write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    os.chmod(path, 0o755)


def push_over_ssh(bundle: Path, target: str) -> None:
    """Copy a .tar.gz bundle to ssh://user@host[:port] and run its installer there (with sudo)."""
    if not bundle.name.endswith(".tar.gz"):
        raise FlashError("--target needs a .tar.gz bundle (--out NAME.tar.gz)")
    url = urlparse(target)
    if url.scheme != "ssh" or not url.hostname:
        raise FlashError(f"target must look like ssh://user@host[:port], got {target!r}")
    login = f"{url.username}@{url.hostname}" if url.username else url.hostname
    port = ["-p", str(url.port)] if url.port else []
    scp_port = ["-P", str(url.port)] if url.port else []
    remote = f"/tmp/{bundle.name}"
    folder = bundle.name[: -len(".tar.gz")]
    subprocess.run(["scp", *scp_port, str(bundle), f"{login}:{remote}"], check=True)
    script = f"cd /tmp && tar xzf {shlex.quote(remote)} && sudo {shlex.quote(folder)}/install.sh"
    subprocess.run(["ssh", *port, login, script], check=True)


SYSTEMD_UNIT = """\
[Unit]
Description=FaceFed Edge agent (federated face recognition)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=facefed
WorkingDirectory=@PREFIX@
ExecStart=@PREFIX@/venv/bin/facefed-agent run --config @PREFIX@/agent.yaml
Restart=always
RestartSec=10
NoNewPrivileges=true
ProtectSystem=strict
ReadWritePaths=@PREFIX@/state
PrivateTmp=true

[Install]
WantedBy=multi-user.target
"""

INSTALL_SCRIPT = """\
#!/bin/sh
# Installs this FaceFed Edge bundle: PREFIX (default /opt/facefed), a venv with the profile's torch and the
# agent, and, unless --no-systemd, a systemd service running as user 'facefed'. Without root or systemd:
#   ./install.sh --prefix="$HOME/facefed" --no-systemd    (then run the command it prints)
# FACEFED_VENV_SYSTEM_SITE=1 lets the venv reuse packages already on the system (e.g. a vendor torch).
set -eu
PREFIX="${PREFIX:-/opt/facefed}"
# The profile's torch (its `torch` field): pip arguments, or "system" for a torch already installed on the system
# (a vendor build), which the venv then reuses. Never an unpinned torch: pip would pick a CUDA build of gigabytes.
TORCH="@TORCH@"
if [ "$TORCH" = "system" ]; then FACEFED_VENV_SYSTEM_SITE=1; fi
SYSTEMD=1
for arg in "$@"; do
    case "$arg" in
        --no-systemd) SYSTEMD=0 ;;
        --prefix=*) PREFIX="${arg#--prefix=}" ;;
        *) echo "usage: install.sh [--prefix=DIR] [--no-systemd]" >&2; exit 2 ;;
    esac
done
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$PREFIX"
if [ "$HERE" != "$(cd "$PREFIX" && pwd)" ]; then
    cp -R "$HERE"/. "$PREFIX"/
fi
chmod 600 "$PREFIX"/tls/device.key
mkdir -p "$PREFIX/state"
VENV_FLAGS=""
# With system packages, the venv uses the system's pip and setuptools too: its own older
# bundled copies would shadow them and fail the dependency check offline.
if [ "${FACEFED_VENV_SYSTEM_SITE:-0}" = "1" ]; then VENV_FLAGS="--system-site-packages --without-pip"; fi
python3 -m venv $VENV_FLAGS "$PREFIX/venv"
WHEEL="$(ls "$PREFIX"/wheels/facefed_edge-*.whl | tail -n 1)"
if [ "$TORCH" != "system" ] && ! "$PREFIX/venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    # shellcheck disable=SC2086 # TORCH holds several pip arguments on purpose
    "$PREFIX/venv/bin/python" -m pip install --quiet $TORCH
fi
"$PREFIX/venv/bin/python" -m pip install --quiet "$WHEEL[@EXTRAS@]"
"$PREFIX/venv/bin/facefed-agent" profiles >/dev/null
if [ "$SYSTEMD" = "1" ] && command -v systemctl >/dev/null 2>&1; then
    id facefed >/dev/null 2>&1 || useradd --system --home "$PREFIX" --shell /usr/sbin/nologin facefed
    chown -R facefed "$PREFIX/state" "$PREFIX/tls/device.key"
    sed "s#@PREFIX@#$PREFIX#g" "$PREFIX/facefed-agent.service" > /etc/systemd/system/facefed-agent.service
    systemctl daemon-reload
    systemctl enable --now facefed-agent.service
    echo "facefed-agent installed in $PREFIX and started (journalctl -u facefed-agent)"
else
    echo "facefed-agent installed in $PREFIX; run: $PREFIX/venv/bin/facefed-agent run --config $PREFIX/agent.yaml"
    echo "(add --exit-when-finished to stop once the aggregator announces the end of the federation)"
fi
"""
