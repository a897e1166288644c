"""Signed global models: the aggregator signs, the agent refuses anything unsigned or altered."""

import dataclasses
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.agent import EdgeAgent
from edge_agent.config import load_agent_config
from edge_agent.trainer import LocalTrainer
from fedwire.chunking import build_transfer
from fedwire.messages import RoundAnnouncement, TrainSettings, TransferManifest
from fedwire.signing import SignatureError, load_signing_key, load_verify_key, sign, verify
from fedwire.topics import Topics
from model_zoo.data import FaceDataset


def _write_keys(tmp_path, name="signing"):
    key = Ed25519PrivateKey.generate()
    private = tmp_path / f"{name}.key"
    public = tmp_path / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _global_transfer(value: float = 1.0):
    return build_transfer("global", "aggregator", 3, 3, {"w": np.full(1000, value, np.float32)}, max_chunk_bytes=1024)


def test_signature_round_trips_through_json_and_catches_every_change(tmp_path):
    private, public = _write_keys(tmp_path)
    key, verify_key = load_signing_key(private), load_verify_key(public)
    manifest, _ = _global_transfer()
    signed = sign(manifest, key)
    verify(TransferManifest.from_json(signed.to_json()), verify_key)
    for change in ({"payload_sha256": "0" * 64}, {"round": 4}, {"model_version": 2}, {"sender": "dev-1"}):
        with pytest.raises(SignatureError, match="does not verify"):
            verify(dataclasses.replace(signed, **change), verify_key)
    with pytest.raises(SignatureError, match="unsigned"):
        verify(manifest, verify_key)
    other = load_signing_key(_write_keys(tmp_path, "other")[0])
    with pytest.raises(SignatureError):
        verify(sign(manifest, other), verify_key)
    announcement = RoundAnnouncement(5, 4, "open", "a" * 32, time.time() + 60, 2, TrainSettings(lr=0.1))
    verify(RoundAnnouncement.from_json(sign(announcement, key).to_json()), verify_key)


@pytest.fixture
def agent(embedded_broker, tmp_path):
    private, public = _write_keys(tmp_path)
    (tmp_path / "faces").mkdir()
    cfg_path = tmp_path / "agent.yaml"
    cfg_path.write_text(f"device_id: cam-01\ndata: faces\nstate_dir: state\nbroker: {embedded_broker}\n"
                        f"aggregator_key: {public}\n")
    config = load_agent_config(cfg_path)
    faces = FaceDataset(np.zeros((4, 112, 112, 3), np.uint8), np.array([0, 0, 1, 1]), ["a", "b"])
    agent = EdgeAgent(config, LocalTrainer(faces, config.state_dir, 4, False, 0))
    agent._connect()
    yield agent, load_signing_key(private)
    agent._link.close()


def _deliver(agent, manifest, chunks):
    topics = Topics()
    for i, chunk in enumerate(chunks):
        agent.handle_message(topics.global_chunk(i), chunk)
    agent.handle_message(topics.global_manifest, manifest.to_json())


def test_agent_refuses_unsigned_and_tampered_models_and_loads_signed_ones(agent):
    agent, key = agent
    manifest, chunks = _global_transfer(1.0)
    _deliver(agent, manifest, chunks)  # unsigned
    assert agent.global_model is None and "unsigned" in agent.last_refusal

    evil, evil_chunks = _global_transfer(666.0)
    forged = dataclasses.replace(sign(manifest, key), payload_sha256=evil.payload_sha256,
                                 chunk_sha256=evil.chunk_sha256)
    _deliver(agent, forged, evil_chunks)  # a signed manifest altered to describe other weights
    assert agent.global_model is None and "does not verify" in agent.last_refusal

    _deliver(agent, sign(manifest, key), chunks)
    assert agent.global_model is not None and agent.global_model.version == 3
    np.testing.assert_array_equal(agent.global_model.tensors["w"], np.full(1000, 1.0, np.float32))

    unsigned_round = RoundAnnouncement(4, 3, "open", "b" * 32, time.time() + 60, 1, TrainSettings())
    agent.handle_message(Topics().round, unsigned_round.to_json())
    assert agent.announcement is None  # never acted on
