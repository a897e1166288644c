"""Fleet dashboard (issue 18): what it costs the federation, and how fast the page loads with 1,000 devices.

Run from the repository root:  python -m bench.dashboard_bench [--same-run-rounds 9] [--pairs 0] [--rounds 4]
                                      [--devices 1000] [--loads 10] [--screenshot runs/dashboard-bench/dashboard.png]

1. Round time. The federation: ORL, 3 clients of 2 identities, MobileFaceNet, 1 local epoch, embedded broker.
   Same run (--same-run-rounds R): one federation with `serve --dashboard`; a headless chromium has the page open
   during even rounds and about:blank during odd ones. Figure: seconds of round 2k (open) over round 2k + 1
   (closed), neighbours under the same machine load; the dashboard process runs throughout.
   Separate runs (--pairs P): A = `serve --dashboard` with the page open in chromium for the whole run, B = no
   dashboard, alternating A B A B so drift on a shared machine hits both alike. Figure: mean seconds of rounds
   2..R (rounds.jsonl `seconds`; round 1 also holds the agents' start) per run, the ratio A/B per pair, and the
   CPU seconds the dashboard process and the browser used in A.
   Either part sends a bad update and saves a screenshot of the page (--screenshot).
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


# ---- 1. round time with and without the dashboard open --------------------------------------------------------

def _steady_round_seconds(out: Path) -> list[float]:
    """`seconds` of rounds 2..R: round 1 also holds the agents' start (imports, data), which the dashboard
    does not touch and which would drown a few per cent."""
    import json

    entries = [json.loads(line) for line in (out / "aggregator" / "rounds.jsonl").read_text().splitlines()]
    return [e["seconds"] for e in entries if e["round"] >= 2]


class CpuMeter:
    """CPU seconds (user + sys) of the dashboard process and of the browser's processes, sampled while they run
    (the dashboard ends with `serve`, so its last sample is what it used)."""

    def __init__(self, run_folder: Path, browser: Browser) -> None:
        self.run_folder = str(run_folder)
        self.browser_root = browser.driver.service.process.pid
        self.dashboard_s = 0.0
        self.browser_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(0.5):
            for proc in psutil.process_iter(["cmdline"]):
                cmd = proc.info["cmdline"] or []
                if "dashboard" in cmd and any(self.run_folder in part for part in cmd):
                    try:
                        self.dashboard_s = max(self.dashboard_s, sum(proc.cpu_times()[:2]))
                    except psutil.Error:
                        pass
            try:
                procs = [psutil.Process(self.browser_root)] + psutil.Process(self.browser_root).children(recursive=True)
                self.browser_s = max(self.browser_s, sum(sum(p.cpu_times()[:2]) for p in procs))
            except psutil.Error:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _federation_run(data: Path, out: Path, rounds: int, with_dashboard: bool,
                    screenshot: Path | None) -> tuple[list[float], float, CpuMeter | None]:
    """One federation; with_dashboard: `serve --dashboard` and a browser on the page for the whole run."""
    from facefed.simulate import run_simulation
    from fedwire.broker import EmbeddedBroker, free_port

    prefix = f"facefed/bench-{out.name}"
    with EmbeddedBroker() as broker:
        port = free_port() if with_dashboard else None
        cfg = tiny_federation(data, out, broker.url, prefix, rounds, port)
        start = time.perf_counter()
        if not with_dashboard:
            run_simulation(cfg)
            return _steady_round_seconds(out), time.perf_counter() - start, None
        outcome: dict = {}
        runner = threading.Thread(target=lambda: outcome.update(result=run_simulation(cfg)), daemon=True)
        runner.start()
        with Browser() as browser:
            url = f"http://127.0.0.1:{port}/"

            def loaded() -> bool:
                browser.driver.get(url)
                return browser.driver.title.startswith("FaceFed")
            browser.wait_until(loaded, 60, "the dashboard")
            meter = CpuMeter(out, browser)
            if screenshot is not None:
                send_bad_update(broker.url, prefix)
                browser.wait_until(lambda: "tensor names differ" in browser.text("#refusals"), 60, "the refusal")
                browser.wait_until(lambda: len(browser.driver.find_elements("css selector", "#rounds tbody tr")) >= 3,
                                   300, "two finished rounds")
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                browser.driver.save_screenshot(str(screenshot))
                print(f"screenshot: {screenshot}")
            runner.join()
            meter.stop()
        if "result" not in outcome:
            raise RuntimeError(f"the federation in {out} failed; see {out / 'logs'}")
        return _steady_round_seconds(out), time.perf_counter() - start, meter


def bench_round_time(pairs: int, rounds: int, screenshot: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as tmp:
        root = Path(tmp)
        data = tiny_orl(root / "orl")
        ratios, shares = [], []
        print(f"\nround time: {pairs} pairs (A = dashboard + open page, B = none), {rounds} rounds each, "
              f"mean of rounds 2..{rounds}")
        for i in range(pairs):
            a, a_wall, meter = _federation_run(data, root / f"a{i}", rounds, True, screenshot if i == 0 else None)
            b, b_wall, _ = _federation_run(data, root / f"b{i}", rounds, False, None)
            ratio = statistics.mean(a) / statistics.mean(b)
            ratios.append(ratio)
            shares.append(meter.dashboard_s / a_wall)
            print(f"  pair {i + 1}: A {statistics.mean(a):.2f} s/round ({' '.join(f'{s:.2f}' for s in a)}; run "
                  f"{a_wall:.0f} s)   B {statistics.mean(b):.2f} s/round ({' '.join(f'{s:.2f}' for s in b)}; run "
                  f"{b_wall:.0f} s)   A/B {ratio:.3f}   CPU in A: dashboard {meter.dashboard_s:.1f} s "
                  f"({100 * shares[-1]:.1f} % of one core over the run), browser {meter.browser_s:.1f} s")
        print(f"  A/B per pair: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}")
        print(f"  dashboard process CPU / run wall time: median {100 * statistics.median(shares):.1f} % of one core")


def bench_open_page(rounds: int, screenshot: Path | None) -> None:
    """One federation with `serve --dashboard`: the page is open in the browser during even rounds and closed
    (about:blank) during odd ones, so each pair of neighbouring rounds ran under the same machine load.
    screenshot: a bad update is sent in round 2 and the page saved early in round 4."""
    import json

    from facefed.simulate import run_simulation
    from fedwire.broker import EmbeddedBroker, free_port

    with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as tmp, EmbeddedBroker() as broker:
        root = Path(tmp)
        port = free_port()
        cfg = tiny_federation(tiny_orl(root / "orl"), root / "run", broker.url, "facefed/bench-open", rounds, port)
        outcome: dict = {}
        runner = threading.Thread(target=lambda: outcome.update(result=run_simulation(cfg)), daemon=True)
        runner.start()
        log_path = cfg.out / "aggregator" / "rounds.jsonl"
        with Browser() as browser:
            opened = -1
            while runner.is_alive():
                lines = log_path.read_text().splitlines() if log_path.exists() else []
                next_round = len(lines)  # entries 0..r are logged: round r + 1 is open now
                # From round 1 on the dashboard listens; after the last round it is stopped with `serve`.
                if next_round != opened and 1 <= next_round <= rounds:
                    opened = next_round
                    browser.driver.get(f"http://127.0.0.1:{port}/" if next_round % 2 == 0 else "about:blank")
                    if screenshot is not None and next_round == 2:
                        send_bad_update(broker.url, cfg.topic_prefix)
                    if screenshot is not None and next_round == 4:
                        browser.wait_until(lambda: "tensor names differ" in browser.text("#devices"), 30,
                                           "the refused sender")
                        screenshot.parent.mkdir(parents=True, exist_ok=True)
                        browser.driver.save_screenshot(str(screenshot))
                        print(f"screenshot: {screenshot}")
                time.sleep(0.1)
        if "result" not in outcome:
            raise RuntimeError(f"the federation failed; see {cfg.out / 'logs'}")
        seconds = {e["round"]: e["seconds"] for e in map(json.loads, log_path.read_text().splitlines())}
    pairs = [(seconds[r], seconds[r + 1]) for r in range(2, rounds, 2)]
    ratios = [a / b for a, b in pairs]
    print(f"\nsame run, page open in even rounds: {rounds} rounds, pairs (open, closed) of neighbouring rounds")
    print("  " + "   ".join(f"r{2 * i + 2}/r{2 * i + 3}: {a:.2f}/{b:.2f} s = {a / b:.3f}" for i, (a, b) in enumerate(pairs)))
    print(f"  open/closed: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}; "
          f"means {statistics.mean(a for a, _ in pairs):.2f} / {statistics.mean(b for _, b in pairs):.2f} s = "
          f"{statistics.mean(a for a, _ in pairs) / statistics.mean(b for _, b in pairs):.3f}")


# ---- 2. page load with N devices ------------------------------------------------------------------------------

def fleet_of(devices: int, rounds: int = 50):
    """A FleetState holding `devices` devices, `rounds` finished rounds and an open round with refusals."""
    from aggregator.dashboard.state import FleetState
    from fedwire.chunking import build_transfer
    from fedwire.messages import DeviceStatus, RoundAnnouncement, TrainSettings, UpdateAck

    state = FleetState("0123456789abcdef")
    now = time.time()
    states = ["online", "training", "uploading", "idle", "offline"]
    for k in range(devices):
        state.on_status(DeviceStatus(f"cam-{k:04d}", states[k % 5], rounds, now - k, profile="rpi4",
                                     model_version=rounds, train_window="open"))
    state.on_log_entries([{"round": r, "model_version": r, "clients": devices, "rejected": r % 3,
                           "bytes_up": 4_000_000 * devices, "bytes_down": 4_000_000 * devices, "seconds": 30.0 + r,
                           "val_accuracy": 0.8 + r / 500, "eer": 0.2 - r / 500, "tar_at_far_1e-3": 0.5 + r / 200}
                          for r in range(rounds + 1)])
    manifest, _ = build_transfer("global", "aggregator", rounds, rounds, {"w": np.ones(4, np.float32)})
    state.on_global_manifest(manifest, None, now)
    announcement = RoundAnnouncement(rounds + 1, rounds, "open", "ab" * 16, now + 600, devices, TrainSettings())
    state.on_announcement(announcement, now)
    for k in range(0, devices, 10):
        state.on_ack(UpdateAck(f"cam-{k:04d}", rounds + 1, f"{k:032x}", k % 20 != 0, "tensor names differ"), now)
    return state


def bench_page_load(devices: int, loads: int) -> None:
    from aggregator.dashboard.app import WebServer, build_app
    from fedwire.broker import free_port

    server = WebServer(build_app(fleet_of(devices)), "127.0.0.1", free_port())
    server.start()
    try:
        with Browser() as browser:
            url = f"http://127.0.0.1:{server.port}/"
            times = []
            for i in range(loads + 1):  # the first load warms the browser's cache of the static files: not counted
                browser.driver.get(url + f"?load={i}")
                ms = browser.wait_until(lambda: browser.driver.execute_script(
                    "return FaceFedDashboard.renderedAt"), 30, "the first render")
                rows = browser.driver.execute_script("return document.querySelectorAll('#devices tbody tr').length")
                assert rows == devices, f"{rows} device rows, expected {devices}"
                if i:
                    times.append(ms / 1000)
        size = len(__import__("json").dumps(fleet_of(devices).status()))
        print(f"\npage load with {devices} devices (/api/status {size / 1e3:.0f} kB), {loads} loads: median "
              f"{statistics.median(times):.3f} s, min {min(times):.3f} s, max {max(times):.3f} s")
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=0,
                        help="A/B pairs of separate federations, with and without the dashboard (default 0)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per federation (default 4; >= 2)")
    parser.add_argument("--devices", type=int, default=1000, help="devices in the page-load state (default 1000)")
    parser.add_argument("--loads", type=int, default=10, help="timed page loads (default 10)")
    parser.add_argument("--screenshot", type=Path, default=Path("runs/dashboard-bench/dashboard.png"),
                        help="where the page is saved during the run (default runs/dashboard-bench/dashboard.png)")
    parser.add_argument("--same-run-rounds", type=int, default=9,
                        help="rounds of the federation whose even rounds have the page open (default 9; 0 = skip)")
    parser.add_argument("--skip-rounds", action="store_true", help="only the page-load part")
    args = parser.parse_args(argv)
    reason = browser_skip_reason()
    if reason:
        parser.error(reason)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (round 1 also holds the agents' start and is left out)")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"load average {os.getloadavg()[0]:.2f}")
    started = time.perf_counter()
    bench_page_load(args.devices, args.loads)
    if not args.skip_rounds:
        if args.same_run_rounds:
            bench_open_page(args.same_run_rounds, args.screenshot if args.same_run_rounds >= 4 else None)
        if args.pairs:
            bench_round_time(args.pairs, args.rounds, None if args.same_run_rounds >= 4 else args.screenshot)
    print(f"\nbench took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
