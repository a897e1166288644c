"""Brokers for tests, benches and single-machine simulations: the embedded amqtt broker (MQTT 3.1.1
only; clients in "auto" mode fall back to it) and a mosquitto process on the loopback interface.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def _import_amqtt_broker() -> type:
    try:
        from amqtt.broker import Broker
    except ImportError as exc:  # amqtt is an aggregator-side extra, not a fedwire dependency
        raise RuntimeError(
            "EmbeddedBroker needs amqtt==0.12.1 (pip install 'facefed-edge[aggregator]') "
            "or use an external broker such as mosquitto"
        ) from exc
    return Broker


class _LatePubackFilter(logging.Filter):
    """amqtt stops waiting for a subscriber's PUBACK after 5 s and logs an ERROR with a traceback. The message
    has already been written to the subscriber's socket and is read in time: an aggregator acknowledges after
    handling (fedwire.mqtt.MqttLink), and a busy one (evaluating a model) may take longer. Logged at debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, TimeoutError) and "waiting for PUBACK" in str(exc):
            log.debug("embedded broker: a subscriber took over 5 s to acknowledge: %s", exc)
            return False
        return True


def _quiet_amqtt_logging() -> None:
    # amqtt logs every connection at INFO, and every refused MQTT 5 probe (expected: clients
    # fall back to 3.1.1) as a WARNING; real faults still show at ERROR.
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.ERROR)
    broker_log = logging.getLogger("amqtt.broker")
    if not any(isinstance(f, _LatePubackFilter) for f in broker_log.filters):
        broker_log.addFilter(_LatePubackFilter())


def _drop_gone_client_errors(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    # amqtt closes a refused connection (an MQTT 5 probe, before the client falls back to 3.1.1) by shutting
    # down a socket the client may have closed already; asyncio would print that OSError as an unhandled error.
    if isinstance(context.get("exception"), OSError):
        log.debug("embedded broker: a client's connection was already gone: %s", context["exception"])
        return
    loop.default_exception_handler(context)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (small race, acceptable for local brokers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _broker_config(host: str, port: int) -> dict:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # Only anonymous auth: no $SYS publisher and no packet/event logger plugins.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


class _StartedInWith:
    """`with broker:` starts it and stops it again."""

    def start(self) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class EmbeddedBroker(_StartedInWith):
    """amqtt broker on its own asyncio loop in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        if self._thread is None:
            raise RuntimeError("broker not started")
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> str:
        if self._thread is not None:
            raise RuntimeError("broker already started")
        broker_class = _import_amqtt_broker()
        _quiet_amqtt_logging()
        if self.port == 0:
            self.port = free_port(self.host)
        self._thread = threading.Thread(target=self._run, args=(broker_class,), name="fedwire-broker", daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_S) or self._error is not None:
            self._thread = None
            where = f"{self.host}:{self.port}"
            raise RuntimeError(f"embedded broker failed to start on {where}: {self._error}") from self._error
        log.info("embedded broker listening on %s", self.url)
        return self.url

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop_requested is not None:
            self._loop.call_soon_threadsafe(self._stop_requested.set)
        self._thread.join(STOP_TIMEOUT_S)
        self._thread = None

    def _run(self, broker_class: type) -> None:
        try:
            asyncio.run(self._serve(broker_class))
        except Exception as exc:  # the thread must not die silently
            if self._started.is_set():
                log.exception("embedded broker on %s:%s stopped with an error", self.host, self.port)
            self._error = exc
            self._started.set()  # unblocks start() when the broker never came up

    async def _serve(self, broker_class: type) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(_drop_gone_client_errors)
        self._stop_requested = asyncio.Event()
        broker = broker_class(_broker_config(self.host, self.port))
        await broker.start()  # returns once the listening socket is bound, so start() can return the url
        self._started.set()
        try:
            await self._stop_requested.wait()
        finally:
            await broker.shutdown()


MOSQUITTO = Path(os.environ.get("FACEFED_MOSQUITTO", "/usr/sbin/mosquitto"))
_LOOPBACK = ("127.0.0.1", "::1", "localhost")
_LISTENER = re.compile(r"^\s*listener\s+(\d+)(?:\s+(\S+))?", re.MULTILINE)


def mosquitto_available() -> bool:
    return os.access(MOSQUITTO, os.X_OK)


def loopback_config(port: int, extra: str = "", persistence_dir: Path | None = None) -> str:
    """A plain, anonymous mosquitto listener on 127.0.0.1:port, plus `extra` config lines."""
    persistence = (f"persistence true\npersistence_location {persistence_dir}/\n" if persistence_dir is not None
                   else "persistence false\n")
    return f"listener {port} 127.0.0.1\nallow_anonymous true\n{persistence}{extra}"


class MosquittoBroker(_StartedInWith):
    """A mosquitto process for tests and benches, listening on the loopback interface only.

    `config` is the text of its mosquitto.conf (loopback_config, or aggregator/broker_config.py's hardened
    one); it is written into `folder` with a `user` line, so that mosquitto started as root stays this user
    instead of dropping to a 'mosquitto' user that may not exist (or that cannot read a 0600 key). Every
    `listener` must be bound to a loopback address. The process is stopped by its PID; start() again
    restarts it on the same port (with persistence, on the same database). Each start logs to its own file."""

    def __init__(self, folder: Path, config: str, scheme: str = "mqtt") -> None:
        if not mosquitto_available():
            raise FileNotFoundError(f"mosquitto is not installed at {MOSQUITTO} (apt-get install mosquitto)")
        listeners = _LISTENER.findall(config)
        if not listeners or any(bind not in _LOOPBACK for _, bind in listeners):
            raise ValueError(f"every mosquitto listener must be bound to a loopback address: {listeners}")
        self.port = int(listeners[0][0])
        self.scheme = scheme
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config = self.folder / "mosquitto.conf"
        self.config.write_text(f"{config.rstrip()}\nuser {getpass.getuser()}\n")
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        """The log file of the latest start."""
        return self.folder / ("mosquitto.log" if self.starts <= 1 else f"mosquitto-{self.starts}.log")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self) -> str:
        if self.running:
            raise RuntimeError("mosquitto is already running")
        self.starts += 1
        with self.log.open("w") as log_file:
            self.process = subprocess.Popen([str(MOSQUITTO), "-c", str(self.config)], stdout=log_file,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}: {self.log_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self.url
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{self.port}: {self.log_text()}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, sig: int) -> None:
        """Send sig (SIGKILL: a crash; SIGTERM: a clean stop) and wait for the process to end."""
        self.process.send_signal(sig)
        self.process.wait(timeout=STOP_TIMEOUT_S)

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its config (ACL, limits; see mosquitto.conf(5) for what reloads)."""
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if not self.running:
            return
        try:
            self.kill(signal.SIGTERM)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Run the embedded FaceFed MQTT broker (amqtt, MQTT 3.1.1) on 127.0.0.1 until SIGTERM/SIGINT."
    )
    parser.add_argument("--port", type=int, default=1883, help="0 picks a free port")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with EmbeddedBroker(port=args.port) as broker:
        print(broker.url, flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
