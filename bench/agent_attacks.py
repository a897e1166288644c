"""Attacks on agents (issue 14 items 3 and 5): bad and stale global models, each against the real EdgeAgent.

The attacker holds the fleet's signing key and a publish right on the aggregator's topics (what a
poisoned aggregation, or a broker that lets one device publish there, amounts to). Every message goes
through the agent's own inbound path (`handle_message`, signatures checked) and a real embedded broker
carries its uploads and statuses; the trainer is the device's real LocalTrainer on a few random faces.
Everything is built from wire JSON, so the same file runs against an older checkout as the baseline:

    python -m bench.agent_attacks                               # this tree
    PYTHONPATH=/path/to/old/checkout python bench/agent_attacks.py   # the baseline, same attacks

One line per attack: what the agent did (refused / used it / crashed) and how long it took.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import save_file

from edge_agent.agent import EdgeAgent
from edge_agent.config import load_agent_config
from edge_agent.trainer import LocalTrainer
from fedwire.broker import EmbeddedBroker
from fedwire.chunking import build_transfer
from fedwire.messages import RoundAnnouncement
from fedwire.signing import sign
from model_zoo.backbones import build_backbone
from model_zoo.checkpoint import shared_tensors
from model_zoo.data import FaceDataset

MODEL = {"arch": "mobilefacenet", "act": "relu", "embedding_size": 128}
TRAIN = {"local_epochs": 1, "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005, "margin": 0.5, "proximal_mu": 0.0,
         "l2sp_alpha": 0.0, "negative_anchors": 0, "anchor_seed": 0, "codec": "safetensors", "model": MODEL}
FEDERATION = 1.7e9


class Attacker:
    """Signs and delivers aggregator messages to one agent, then lets it act on them."""

    def __init__(self, folder: Path, broker: str) -> None:
        self.folder = folder
        self.broker = broker
        self.key = Ed25519PrivateKey.generate()
        public = folder / "signing.pub"
        public.write_bytes(self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo))
        (folder / "faces").mkdir()
        (folder / "agent.yaml").write_text(json.dumps({"device_id": "cam-01", "data": "faces", "state_dir": "state",
                                                       "broker": broker, "protocol": "3.1.1",
                                                       "aggregator_key": str(public)}))
        rng = np.random.default_rng(0)
        self.faces = FaceDataset(rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8), np.array([0, 0, 1, 1]),
                                 ["a", "b"])
        self.agent = self.start_agent()

    def start_agent(self) -> EdgeAgent:
        """A (re)started agent process: the same config and state directory."""
        config = load_agent_config(self.folder / "agent.yaml")
        agent = EdgeAgent(config, LocalTrainer(self.faces, config.state_dir, 4, False, 0))
        agent._connect()
        self.agent = agent
        return agent

    def stop_agent(self) -> None:
        self.agent._link.close()

    def deliver_global(self, version: int, tensors: dict[str, np.ndarray]) -> None:
        manifest, chunks = build_transfer("global", "aggregator", version, version, tensors)
        topics = self.agent.topics
        for i, chunk in enumerate(chunks):
            self.agent.handle_message(topics.global_chunk(i), chunk)
        self.agent.handle_message(topics.global_manifest, sign(manifest, self.key).to_json())

    def announce(self, round_number: int, version: int, expires_in: float = 600.0) -> None:
        now = time.time()
        wire = {"protocol": 1, "round": round_number, "model_version": version, "state": "open",
                "announce_id": secrets.token_hex(16), "deadline": now + 60, "min_clients": 1, "train": TRAIN,
                "expires": now + expires_in, "federation": FEDERATION}
        announcement = sign(RoundAnnouncement.from_dict(wire), self.key)
        self.agent.handle_message(self.agent.topics.round, announcement.to_json())

    def act(self) -> str:
        """Let the agent act: 'trained round r from vN', 'refused (why)', 'used it: holds vN, follows round r' or
        'crashed: ...' (what used to end the agent process)."""
        before = self.agent.rounds_trained
        try:
            self.agent._maybe_train(time.time())
        except Exception as exc:
            return f"crashed: {type(exc).__name__}: {str(exc)[:90]}"
        ann, model = self.agent.announcement, self.agent.global_model
        if self.agent.rounds_trained > before:
            return f"trained round {ann.round} from v{ann.model_version}"
        if self.agent.last_refusal:
            return f"refused ({self.agent.last_refusal[:110]})"
        held = "no model" if model is None else f"v{model.version}"
        return f"used it: holds {held}, follows round {'-' if ann is None else ann.round}"


def _tensors(scale: float = 1.0) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return {k: (v * scale if np.issubdtype(v.dtype, np.floating) else v)
            for k, v in shared_tensors(build_backbone("mobilefacenet")).items()}


def _inf(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, np.inf) if np.issubdtype(v.dtype, np.floating) else v for k, v in tensors.items()}


def run_attacks(folder: Path, broker: str) -> list[tuple[str, str, float]]:
    """(attack, what the agent did, seconds) for each attack, in order; each starts from the state the last left."""
    a = Attacker(folder, broker)
    results = []

    def step(name: str, deliver) -> None:
        start = time.perf_counter()
        a.agent.last_refusal = ""
        try:
            deliver()
            outcome = a.act()
        except Exception as exc:
            outcome = f"crashed: {type(exc).__name__}: {str(exc)[:90]}"
        results.append((name, outcome, time.perf_counter() - start))
        print(f"{name:58s} | {outcome} | {results[-1][2]:.1f} s", flush=True)

    step("honest round 2 (v1)", lambda: (a.deliver_global(1, _tensors()), a.announce(2, 1)))
    step("signed all-Inf model v2, round 3", lambda: (a.deliver_global(2, _inf(_tensors())), a.announce(3, 2)))
    step("next good model v3, round 4", lambda: (a.deliver_global(3, _tensors(0.99)), a.announce(4, 3)))
    step("replayed older signed model v1", lambda: a.deliver_global(1, _tensors()))
    step("replayed older signed round 2 (v1)", lambda: a.announce(2, 1))
    step("expired announcement round 5 (2 days old)", lambda: a.announce(5, 3, expires_in=-2 * 86400))

    def restart_then_replay():
        a.stop_agent()
        a.start_agent()
        a.deliver_global(1, _tensors())
        a.announce(2, 1)
    step("agent restarted, then round 2 (v1) replayed", restart_then_replay)

    def planted_inf_head():
        a.stop_agent()
        head = a.agent.trainer.head_path
        save_file({"weight": np.full((2, 128), np.inf, np.float32)}, str(head))
        a.start_agent()
        a.deliver_global(6, _tensors(0.98))
        a.announce(7, 6)
    step("restart with a non-finite stored head, good round 7", planted_inf_head)

    def truncated_head():
        a.stop_agent()
        head = a.agent.trainer.head_path
        head.write_bytes(head.read_bytes()[:100])
        a.start_agent()
        a.deliver_global(8, _tensors(0.97))
        a.announce(9, 8)
    step("restart with a truncated stored head, good round 9", truncated_head)
    a.stop_agent()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)  # the table is the output; refusals are in it
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(port=0) as broker:
        run_attacks(Path(tmp), broker.url)
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
