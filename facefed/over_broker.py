"""One federation over a real MQTT broker, in this process: the aggregator service and one EdgeAgent per device,
each in its own thread, with the trainers and model hooks a caller gives.

The same fleet as facefed.inprocess.run_inprocess, through the whole wire path instead of the engine alone:
announcements, chunked uploads and their acks, the service's intake and budgets, retained global models. It is
what the camera experiment's federated arms run on by default (`--transport mqtt`). The broker is the embedded
amqtt one on a free loopback port unless `broker` names another (e.g. a Mosquitto a test started).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

from aggregator.config import AggregatorConfig
from aggregator.rounds import ModelHooks, RoundEngine
from aggregator.service import AggregatorService
from edge_agent.agent import EdgeAgent
from edge_agent.config import load_agent_config
from facefed.inprocess import Device
from fedwire.broker import EmbeddedBroker

AGENTS_FOLLOW_S = 60.0  # how long agents may take to see the end once the service is done


class FederationStalled(RuntimeError):
    """The service or an agent had not finished when the time allowed ran out."""


def run_over_broker(config: AggregatorConfig, devices: list[Device], models: ModelHooks, home: Path,
                    broker: str | None = None, timeout_s: float = 3600.0) -> RoundEngine:
    """Run `config.rounds` rounds with an agent per device (state under `home`/<device id>); returns the engine
    (its state dir holds the journal and checkpoints). An error in the service or an agent is raised here."""
    if any(d.tamper is not None for d in devices):
        raise ValueError("tamper hooks run in process only (facefed.inprocess.run_inprocess)")
    if broker is None:
        with EmbeddedBroker(port=0) as embedded:
            return run_over_broker(config, devices, models, home, embedded.url, timeout_s)
    config = replace(config, broker=broker)
    service = AggregatorService(config, models)
    agents = [EdgeAgent(_agent_config(home / d.device_id, d.device_id, broker), d.trainer) for d in devices]
    errors: list[BaseException] = []

    def run(target) -> None:
        try:
            target()
        except BaseException as exc:  # raised again in the caller's thread, not lost in this one
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(x.run,), name=name, daemon=True)
               for x, name in [(service, "aggregator"), *((a, a.device_id) for a in agents)]]
    for thread in threads:
        thread.start()
    threads[0].join(timeout_s)  # the service ends the federation; the agents follow its "finished" announcement
    follow_until = time.monotonic() + (0 if errors or threads[0].is_alive() else AGENTS_FOLLOW_S)
    for thread in threads[1:]:
        thread.join(max(0.0, follow_until - time.monotonic()))
    if errors:
        raise errors[0]
    stalled = [t.name for t in threads if t.is_alive()]
    if stalled:
        raise FederationStalled(f"not finished after {timeout_s:.0f} s: {', '.join(stalled)}")
    return service.engine


def _agent_config(home: Path, device_id: str, broker: str):
    """The agent's config file as a fleet operator writes it; its data folder stays empty (the trainer holds the
    device's data)."""
    (home / "data").mkdir(parents=True, exist_ok=True)
    path = home / "agent.yaml"
    path.write_text(f"device_id: {device_id}\ndata: data\nstate_dir: state\nbroker: {broker}\n"
                    "exit_when_finished: true\n")
    return load_agent_config(path)
