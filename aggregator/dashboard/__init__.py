"""The read-only fleet dashboard: a sibling of the aggregator that shares nothing with its round loop
but the config (broker address, topic prefix, state_dir). It reads the broker's public topics as its own
MQTT client and tails state_dir/rounds.jsonl, and serves a live page and a JSON API (docs/operators.md)."""

from __future__ import annotations

import logging
import os
import signal
import ssl
import subprocess
import sys
import threading
from pathlib import Path

from aggregator.config import AggregatorConfig, parse_listen
from fedwire.config import TlsConfig
from fedwire.signing import load_verify_key

from .app import WebServer, build_app
from .feed import DashboardFeeds, FleetFeed, key_fingerprint
from .state import FleetState

log = logging.getLogger("facefed.dashboard")
PARENT_POLL_S = 1.0


class Dashboard:
    """Feeds plus web server, in this process; `listen` overrides config.dashboard.listen."""

    def __init__(self, config: AggregatorConfig, listen: str | None = None) -> None:
        settings = config.dashboard
        self.host, port = parse_listen(listen or settings.listen or "127.0.0.1:0")
        verify_path = settings.verify_key or _public_key_beside(config.signing_key)
        try:
            verify_key = load_verify_key(verify_path) if verify_path is not None else None
        except ValueError as exc:
            raise ValueError(f"dashboard.verify_key {verify_path}: not an Ed25519 public key (PEM): {exc}") from None
        self.state = FleetState(key_fingerprint(verify_key) if verify_key is not None else "")
        broker = config.broker or f"mqtt://127.0.0.1:{config.embedded_port}"
        # Without a certificate of its own it still trusts the broker through the fleet CA.
        mqtt_tls = settings.mqtt_tls if settings.mqtt_tls.certfile else \
            TlsConfig(ca_cert=settings.mqtt_tls.ca_cert or config.tls.ca_cert)
        self.feeds = DashboardFeeds(self.state, FleetFeed(self.state, config.topics, verify_key), broker,
                                    config.state_dir, protocol=config.protocol,
                                    tls=mqtt_tls.files() if broker.startswith("mqtts://") else None)
        self.token = token = settings.bearer_token()
        https = settings.https
        self.scheme = "https" if https.certfile else "http"
        ssl_options = {}
        if https.certfile:
            ssl_options = {"ssl_certfile": str(https.certfile), "ssl_keyfile": str(https.keyfile)}
            if https.ca_cert:
                ssl_options.update(ssl_ca_certs=str(https.ca_cert), ssl_cert_reqs=ssl.CERT_REQUIRED)
        self.web = WebServer(build_app(self.state, token), self.host, port, ssl_options)

    def start(self) -> None:
        self.feeds.start()
        self.web.start()
        log.info("dashboard at %s", self.url)

    def stop(self) -> None:
        self.web.stop()
        self.feeds.stop()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.web.port}/"


def _public_key_beside(signing_key: Path | None) -> Path | None:
    """The PKI layout keeps signing.pub next to signing.key (fedwire/pki_layout.py)."""
    if signing_key is None:
        return None
    public = signing_key.with_suffix(".pub")
    return public if public.is_file() else None


def run_dashboard(config: AggregatorConfig, exit_with_parent: bool = False) -> None:
    """Serve until SIGTERM or Ctrl-C, or (exit_with_parent) once the process that started this one is gone."""
    dashboard = Dashboard(config)
    parent = os.getppid()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    dashboard.start()
    print(f"dashboard: {dashboard.url}", flush=True)
    try:
        while not stop.wait(PARENT_POLL_S):
            if exit_with_parent and os.getppid() != parent:  # reparented: serve died without stopping us
                break
    except KeyboardInterrupt:
        pass
    finally:
        dashboard.stop()


def spawn_dashboard(config_path: Path, listen: str | None, extra_args: list[str] = ()) -> subprocess.Popen:
    """`facefed-aggregator dashboard` as a child process: its own interpreter, so it never holds the
    round loop's GIL. Its output goes where ours does."""
    command = [sys.executable, "-m", "aggregator", "dashboard", "--config", str(config_path), "--exit-with-parent",
               *extra_args]
    if listen:
        command += ["--listen", listen]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL)
