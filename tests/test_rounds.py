"""The round engine on its own: no broker, no torch in the engine; a recording publisher stands in for MQTT."""

import subprocess
import sys

import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.rounds import Close, RoundEngine, close_check
from aggregator.strategies import FedAvg
from fedwire.chunking import CompletedTransfer, build_transfer
from fedwire.config import parse_config
from model_zoo.checkpoint_file import BackboneSpec, read_checkpoint

START = {"w": np.zeros(4, np.float32), "bn.running_mean": np.zeros(2, np.float32),
         "bn.running_var": np.ones(2, np.float32)}


class Recorder:
    """The engine's Publisher: keeps what would go out."""

    def __init__(self):
        self.announcements, self.globals, self.summaries = [], [], []

    def announce(self, announcement):
        self.announcements.append(announcement)

    def publish_global(self, model):
        self.globals.append(model)
        return sum(v.nbytes for v in model.tensors.values())

    def publish_summary(self, summary):
        self.summaries.append(summary)


class TinyModel:
    """ModelHooks of a 8-number model: no torch."""

    spec = BackboneSpec("mobilefacenet", {"embedding_size": 8, "act": "relu"})

    def __init__(self, config):
        from aggregator.models import train_settings

        self.train_settings = train_settings(config)

    def initial_tensors(self):
        return {k: v.copy() for k, v in START.items()}

    def evaluate(self, round_number, tensors):
        return {"w_mean": float(np.mean(tensors["w"]))}

    def export(self, checkpoint):
        pass


def _engine(tmp_path, **fields):
    config = parse_config(AggregatorConfig, {"state_dir": str(tmp_path / "state"), "rounds": 3, "min_clients": 2,
                                             "model": {"embedding_size": 8}, **fields})
    engine = RoundEngine(config, FedAvg(), TinyModel(config), Recorder())
    engine.restore_or_init()
    engine.start()
    return engine


def _upload(engine, device, tensors, *, round_number=None, version=None, n=10, kind="update"):
    """Screen and accept one upload as the intake would; returns the verdict (None: ignored)."""
    manifest, _ = build_transfer(kind, device, engine.current.number if round_number is None else round_number,
                                 engine.model_version if version is None else version, tensors, num_samples=n)
    verdict = engine.screen(device, manifest)
    if verdict is not None:
        return verdict
    return engine.accept(device, CompletedTransfer(manifest, tensors, manifest.payload_bytes))


def _shifted(delta, base=START):
    return {k: (v + delta).astype(v.dtype) for k, v in base.items()}


def test_the_engine_imports_neither_paho_nor_torch():
    code = "import sys, aggregator.rounds; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'paho'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_close_check_is_quorum_or_deadline():
    assert close_check(2, 2, now=0, deadline=10) is Close.CLOSE
    assert close_check(1, 2, now=0, deadline=10) is Close.WAIT
    assert close_check(1, 2, now=10, deadline=10) is Close.CLOSE
    assert close_check(0, 2, now=11, deadline=10) is Close.EMPTY


def test_verdicts_then_quorum_close_makes_the_weighted_mean_and_a_checkpoint(tmp_path):
    engine = _engine(tmp_path)
    assert engine.current.number == 1 and engine.publisher.announcements[-1].state == "open"
    assert _upload(engine, "dev-a", _shifted(1.0), n=30).accepted
    second = _upload(engine, "dev-a", _shifted(5.0))
    assert not second.accepted and "already accepted" in second.reason
    assert "stale" in _upload(engine, "dev-b", _shifted(1.0), round_number=0).reason
    assert "model version" in _upload(engine, "dev-c", _shifted(1.0), version=7).reason
    assert "shape" in _upload(engine, "dev-d", {**START, "w": np.zeros(3, np.float32)}).reason
    assert engine.current.rejected == 3 and engine.strategy.num_updates == 1
    engine.tick(0.0)  # one of two: the round waits
    assert engine.model_version == 0
    assert _upload(engine, "dev-g", _shifted(0.5), n=10).num_samples == 10
    engine.tick(0.0)
    assert engine.model_version == 1 and engine.current.number == 2
    np.testing.assert_allclose(engine.global_tensors["w"], (30 * 1.0 + 10 * 0.5) / 40, atol=1e-6)
    summary = engine.publisher.summaries[-1]
    assert summary.clients == ["dev-a", "dev-g"] and summary.num_samples == 40 and summary.metrics["w_mean"] > 0.8
    tensors, spec, meta = read_checkpoint(engine.state.checkpoint_path(1))
    assert spec == TinyModel.spec and meta["round"] == 1
    assert all(np.array_equal(tensors[k], v) for k, v in engine.global_tensors.items())
    assert engine.state.read_log()[-1]["rejected"] == 3


def test_deadline_closes_with_what_arrived_or_announces_an_empty_round_again(tmp_path):
    engine = _engine(tmp_path)
    first = engine.current.announcement
    engine.tick(first.deadline + 1)
    assert engine.model_version == 0 and engine.current.number == 1
    assert engine.current.announcement.announce_id != first.announce_id
    _upload(engine, "dev-a", _shifted(1.0))
    engine.tick(engine.current.announcement.deadline + 1)
    assert engine.model_version == 1  # one of two was enough once the deadline passed


def test_a_non_finite_update_is_refused_and_the_round_completes_with_the_honest_ones(tmp_path):
    engine = _engine(tmp_path)
    poisoned = _upload(engine, "dev-x", {**START, "w": np.full(4, np.inf, np.float32)})
    assert not poisoned.accepted and engine.current.rejected == 1
    _upload(engine, "dev-a", _shifted(1.0))
    _upload(engine, "dev-b", _shifted(3.0))
    engine.tick(0.0)
    assert engine.model_version == 1 and engine.publisher.summaries[-1].clients == ["dev-a", "dev-b"]
    np.testing.assert_allclose(engine.global_tensors["w"], 2.0)


def test_the_statistics_phase_replaces_the_averaged_statistics(tmp_path):
    engine = _engine(tmp_path, bn_statistics="measured")
    _upload(engine, "dev-a", _shifted(1.0), n=30)
    _upload(engine, "dev-b", _shifted(1.0), n=10)
    engine.tick(0.0)
    phase = engine.current
    assert (phase.kind, phase.announcement.state, engine.model_version) == ("statistics", "statistics", 1)
    assert not engine.state.checkpoint_path(1).exists()
    stats = {k: v for k, v in engine.global_tensors.items() if k.startswith("bn.")}
    _upload(engine, "dev-a", {k: np.full_like(v, 3.0) for k, v in stats.items()}, n=30, kind="statistics")
    _upload(engine, "dev-b", {k: np.full_like(v, 1.0) for k, v in stats.items()}, n=10, kind="statistics")
    engine.tick(0.0)
    assert engine.current.number == 2 and engine.current.kind == "update"
    np.testing.assert_array_equal(engine.global_tensors["bn.running_var"], np.full(2, 2.5, np.float32))
    assert engine.publisher.globals[-1].patch is not None  # only the statistics travel the second time
    assert engine.state.checkpoint_path(1).exists()


def test_a_restarted_engine_resumes_the_journaled_updates_of_its_open_round(tmp_path):
    engine = _engine(tmp_path)
    _upload(engine, "dev-a", _shifted(1.0), n=30)
    restarted = _engine(tmp_path)  # same state dir: the crash came after dev-a's ack
    assert restarted.current.accepted == {"dev-a": 30} and restarted.strategy.num_updates == 1
    assert not _upload(restarted, "dev-a", _shifted(1.0)).accepted  # counted once
    _upload(restarted, "dev-b", _shifted(0.5), n=10)
    restarted.tick(0.0)
    assert restarted.model_version == 1
    np.testing.assert_allclose(restarted.global_tensors["w"], (30 * 1.0 + 10 * 0.5) / 40, atol=1e-6)
    again = _engine(tmp_path)  # after the round: resumes from its checkpoint, round 2 open, nothing journaled
    assert again.model_version == 1 and again.current.number == 2 and not again.current.accepted


def test_the_engine_is_done_after_its_rounds(tmp_path):
    engine = _engine(tmp_path, rounds=1, min_clients=1)
    _upload(engine, "dev-a", _shifted(1.0))
    engine.tick(0.0)
    assert engine.done and engine.finished_announcement().state == "finished"
