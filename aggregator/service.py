"""The aggregator service: the round engine (aggregator/rounds.py) on an MQTT connection.

All MQTT callbacks only enqueue; one thread handles the queue and drives the engine, so no locks are
needed around the round state. Every inbound message is checked and a bad one is logged and dropped
without stopping the service.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aggregator.config import AggregatorConfig
from aggregator.connection import Connection, Event, handle
from aggregator.intake import Intake
from aggregator.models import FaceModels, strategy_for
from aggregator.publisher import MqttPublisher
from aggregator.rounds import ModelHooks, RoundEngine, Verdict
from fedwire.signing import load_signing_key

log = logging.getLogger("facefed.aggregator")


@dataclass
class Parts:
    """An aggregator process's pieces: the engine and, around it, the connection, intake and publisher."""

    engine: RoundEngine
    connection: Connection
    intake: Intake
    publisher: MqttPublisher

    def keep_up(self) -> None:
        """Between messages: publish the retained state again after a reconnection; re-read revoked devices."""
        if self.connection.reconnected():
            log.info("connection to the broker re-established: publishing the global model v%d and round state "
                     "again", self.engine.model_version)
            self.publisher.republish()
        self.connection.reload_revoked()


def assemble(config: AggregatorConfig, on_round_open: Callable[[], None] | None = None,
             on_verdict: Callable[[Verdict], None] | None = None, models: ModelHooks | None = None) -> Parts:
    """The parts of `config`: its strategy (with DP if asked), face model (or the `models` hooks an experiment
    federates instead, e.g. the camera adaptation's shared part), state dir, broker connection."""
    signing_key = load_signing_key(config.signing_key) if config.signing_key else None
    publisher = MqttPublisher(config.topics, config.max_chunk_bytes, signing_key)
    strategy, dp = strategy_for(config)

    def round_opened() -> None:  # every device's budget starts again with each round
        connection.new_round()
        if on_round_open is not None:
            on_round_open()

    engine = RoundEngine(config, strategy, models or FaceModels(config), publisher, dp=dp,
                         on_round_open=round_opened)
    connection = Connection(config, engine.models.update_bytes())
    intake = Intake(engine, config.topics, publisher.ack, revoked=lambda device_id: device_id in connection.budget.revoked,
                    on_verdict=on_verdict)
    return Parts(engine, connection, intake, publisher)


class AggregatorService:
    """Announce a round, collect updates, aggregate, publish, repeat: until all configured rounds are done."""

    def __init__(self, config: AggregatorConfig, models: ModelHooks | None = None) -> None:
        self.config = config
        self.parts = assemble(config, models=models)
        self.engine, self.connection, self.intake, self.publisher = (self.parts.engine, self.parts.connection,
                                                                     self.parts.intake, self.parts.publisher)

    # The engine's state, read by tests, benches and the CLI.
    strategy = property(lambda self: self.engine.strategy)
    state = property(lambda self: self.engine.state)
    current = property(lambda self: self.engine.current)
    model_version = property(lambda self: self.engine.model_version)
    global_tensors = property(lambda self: self.engine.global_tensors)

    def run(self) -> None:
        """Serve until all configured rounds are complete."""
        try:
            self.start()
            while not self.engine.done:
                self.serve_once()
            self.publisher.announce(self.engine.finished_announcement())
        finally:
            self.close()

    def start(self) -> None:
        """Restore or initialise the state dir, connect, publish the global model and open the next round."""
        self.engine.restore_or_init()
        self.publisher.link = self.connection.connect(self.config.topics.aggregator_subscriptions())
        self.engine.start()

    def serve_once(self, now: float | None = None) -> None:
        """Handle the next inbound message (if one comes within a poll interval), then close the round if due."""
        event = self.connection.next_event()
        if event is not None:
            self.handle_event(event)
        self.parts.keep_up()
        self.tick(time.time() if now is None else now)

    def tick(self, now: float) -> None:
        """Expire stale transfers and close the open round if its quorum is in or its deadline passed."""
        self.intake.expire(now)
        self.engine.tick(now)

    def handle_event(self, event: Event) -> None:
        handle(event, self.handle_message)

    def handle_message(self, topic: str, payload: bytes) -> None:
        self.intake.handle_message(topic, payload)

    def close(self) -> None:
        self.connection.close()
