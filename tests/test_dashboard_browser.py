"""The dashboard in a real browser (Debian's headless chromium) while a real federation runs: embedded broker,
`facefed-aggregator serve --dashboard`, three agent processes, three rounds of a MobileFaceNet on 8 ORL people."""

from __future__ import annotations

import json
import threading
import time

import pytest

from bench.dashboard_bench import DATA_ROOT, Browser, browser_skip_reason, send_bad_update, tiny_federation, tiny_orl
from fedwire.broker import EmbeddedBroker, free_port
from fedwire.messages import DeviceStatus
from fedwire.mqtt import MqttLink
from fedwire.topics import Topics

pytestmark = pytest.mark.e2e
PREFIX = "facefed/dash-browser"
ROUNDS = 3


@pytest.fixture(scope="module")
def browser():
    reason = browser_skip_reason()
    if reason:
        pytest.skip(reason)
    with Browser() as b:
        yield b


def _open(browser: Browser, url: str) -> None:
    """Load the page once the dashboard process listens (chromium shows an error page until then)."""
    def loaded() -> bool:
        browser.driver.get(url)
        return browser.driver.title.startswith("FaceFed")
    browser.wait_until(loaded, 60, f"{url} (the dashboard never answered)")


def _fake_device_goes_offline(broker: str, topics: Topics) -> None:
    """A device that was online, then lost its connection (the payload its last will carries)."""
    link = MqttLink(broker, client_id="test-sleepy", on_message=lambda t, p: None, subscriptions=[])
    link.connect()
    try:
        now = time.time()
        link.publish(topics.status("sleepy-cam"), DeviceStatus("sleepy-cam", "online", None, now).to_json(), retain=True)
        link.publish(topics.status("sleepy-cam"), DeviceStatus("sleepy-cam", "offline", None, now + 1,
                                                               "connection lost").to_json(), retain=True)
    finally:
        link.close()


def test_page_follows_a_real_federation(browser, tmp_path):
    if not (DATA_ROOT / "orl").is_dir():
        pytest.skip(f"ORL dataset not found at {DATA_ROOT / 'orl'} (set FACEFED_DATA_ROOT)")
    from facefed.simulate import run_simulation

    topics = Topics(PREFIX)
    with EmbeddedBroker() as broker:
        port = free_port()
        cfg = tiny_federation(tiny_orl(tmp_path / "orl"), tmp_path / "run", broker.url, PREFIX, ROUNDS, port)
        outcome: dict = {}

        def federate() -> None:
            try:
                outcome["result"] = run_simulation(cfg)
            except Exception as exc:  # reported by the main thread
                outcome["error"] = exc

        runner = threading.Thread(target=federate, daemon=True)
        runner.start()
        d = browser.driver
        url = f"http://127.0.0.1:{port}/"
        _open(browser, url)

        # The three agents, listed as online, in the round the aggregator opened.
        rows = lambda: {r.get_attribute("data-device"): r for r in d.find_elements("css selector", "#devices tbody tr")}
        browser.wait_until(lambda: {f"client-{k}" for k in range(3)} <= set(rows()), 90, "the three agents")
        assert all("online" in rows()[f"client-{k}"].get_attribute("class") for k in range(3))
        first = browser.wait_until(lambda: int(browser.text("#round-number")) >= 1 and int(browser.text("#round-number")),
                                   90, "round 1 or later")
        assert browser.text("#round-state") in ("training", "closing")
        assert "/ 3" in browser.text("#quorum")

        # A bad update: its refusal reason shows in the round panel and in the sender's row.
        send_bad_update(broker.url, PREFIX)
        browser.wait_until(lambda: "tensor names differ" in browser.text("#refusals"), 30, "the refusal reason")
        assert "tensor names differ" in rows()["rogue-cam"].find_element("css selector", "td.refusal").text
        _fake_device_goes_offline(broker.url, topics)
        browser.wait_until(lambda: "offline" in rows().get("sleepy-cam").get_attribute("class"), 30,
                           "sleepy-cam offline")
        assert rows()["sleepy-cam"].find_element("css selector", "td.state").text == "offline"

        # The device page of the refused sender: its refused upload with the reason.
        d.get(url + "devices/rogue-cam")
        browser.wait_until(lambda: "tensor names differ" in browser.text("#device-events"), 30, "the device's refusal")
        assert browser.text("#device-events tr.refused td:nth-child(2)") == "refused"

        _open(browser, url)
        # The round number advances, and the accuracy chart has one point per finished round (0 = initial model).
        browser.wait_until(lambda: int(browser.text("#round-number")) > first, 180, "the next round")
        logged = browser.wait_until(lambda: len(d.find_elements("css selector", "#rounds tbody tr")) >= 3 and
                                    len(d.find_elements("css selector", "#rounds tbody tr")), 180, "two finished rounds")
        points, accuracy = d.execute_script("return FaceFedDashboard.charts.quality.data.slice(0, 2)")
        assert points == list(range(len(points))) and len(points) >= logged
        assert all(isinstance(a, (int, float)) and 0 < a <= 1 for a in accuracy)  # JSON 1.0 arrives as 1
        entries = [json.loads(line) for line in (cfg.out / "aggregator" / "rounds.jsonl").read_text().splitlines()]
        assert [e["val_accuracy"] for e in entries[:len(points)]] == pytest.approx(accuracy)

        runner.join(timeout=300)
        assert "error" not in outcome, outcome.get("error")
        assert [r["round"] for r in outcome["result"].rounds] == list(range(ROUNDS + 1))
