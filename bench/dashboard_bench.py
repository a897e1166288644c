"""Fleet dashboard (issue 18): what it costs the federation, and how fast the page loads with 1,000 devices.

Run from the repository root:  python -m bench.dashboard_bench [--pairs 3] [--rounds 3] [--devices 1000]
                                                               [--screenshot runs/dashboard.png]

1. Round time: the same tiny federation (ORL, 3 clients of 2 identities, MobileFaceNet, 1 local epoch,
   embedded broker) run in pairs, A = `serve --dashboard` with a headless chromium keeping the page open for the
   whole run, B = no dashboard; A and B alternate (A B A B ...) so drift on a shared machine hits both alike.
   Figure: mean round seconds (rounds.jsonl `seconds`, rounds 1..R) of each run, and the ratio A/B per pair.
   During the first A run a bad update is sent and the page is saved as a screenshot.
2. Page load: a dashboard whose state holds N devices and 50 finished rounds (fed straight into FleetState, no
   broker), loaded by headless chromium K times; time from navigation start until the devices table holds N rows
   and the charts are drawn (performance.now() in the page).

The browser helpers here are also what tests/test_dashboard_browser.py drives.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Headless, nothing fetched from outside this machine (no updates, sync or field trials), a throwaway profile.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1800"]
DATA_ROOT = Path(os.environ.get("FACEFED_DATA_ROOT", Path(__file__).resolve().parents[1].parent / "shared" / "datasets"))


def browser_skip_reason() -> str | None:
    """Why the browser checks cannot run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install {package})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


class Browser:
    """Debian's chromium, headless, driven by chromedriver through selenium, with a fresh profile."""

    def __init__(self) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = Path(tempfile.mkdtemp(prefix="facefed-chromium-"))
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in CHROMIUM_FLAGS + [f"--user-data-dir={self.profile}"]:
            options.add_argument(flag)
        # An explicit driver path: selenium then never tries to download one.
        self.driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)

    def text(self, css: str) -> str:
        from selenium.webdriver.common.by import By

        return " ".join(e.text for e in self.driver.find_elements(By.CSS_SELECTOR, css))

    def wait_until(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = predicate()
            except Exception:  # the page may be mid-render; the last failure is reported below
                value = None
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"the page never showed {what} within {timeout:.0f} s")

    def close(self) -> None:
        self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tiny_orl(root: Path, identities: int = 8) -> Path:
    """The first `identities` ORL people as a folder-per-identity dataset (3 clients x 2 + 2 held out)."""
    from model_zoo.data import load_dataset, save_folders

    dataset = load_dataset(DATA_ROOT / "orl")
    save_folders(dataset.subset(np.flatnonzero(dataset.labels < identities)), root)
    return root


def tiny_federation(data: Path, out: Path, broker: str, prefix: str, rounds: int,
                    dashboard_port: int | None):
    from facefed.simulate import SimulationConfig

    return SimulationConfig(data=[data], out=out, clients=3, rounds=rounds, local_epochs=1, holdout=2,
                            broker=broker, topic_prefix=prefix, batch_size=16, max_chunk_bytes=256 * 1024,
                            dashboard_port=dashboard_port)


def send_bad_update(broker: str, prefix: str, device_id: str = "rogue-cam", timeout: float = 120.0) -> None:
    """Once a round is open, upload an update for it whose tensors are not the model's: it must be refused."""
    from fedwire.chunking import build_transfer
    from fedwire.messages import RoundAnnouncement
    from fedwire.mqtt import MqttLink
    from fedwire.topics import Topics

    topics = Topics(prefix)
    announced: list[RoundAnnouncement] = []
    opened = threading.Event()

    def on_round(topic: str, payload: bytes) -> None:
        ann = RoundAnnouncement.from_json(payload)
        if ann.state == "open" and ann.round >= 1:
            announced.append(ann)
            opened.set()

    link = MqttLink(broker, client_id=f"bench-{device_id}", on_message=on_round, subscriptions=[topics.round])
    link.connect()
    try:
        if not opened.wait(timeout):
            raise RuntimeError("no round was opened")
        ann = announced[-1]
        manifest, chunks = build_transfer("update", device_id, ann.round, ann.model_version,
                                          {"not_a_layer": np.zeros(3, np.float32)}, num_samples=10)
        link.publish_transfer(topics.update_manifest(device_id), lambda i: topics.update_chunk(device_id, i),
                              manifest, chunks)
    finally:
        link.close()
