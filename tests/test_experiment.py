"""`facefed experiment` end to end on a tiny ORL slice: every arm, the federated ones over real MQTT."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from aggregator.config import load_aggregator_config
from aggregator.models import train_settings
from facefed.cli import main
from facefed.experiment import ExperimentConfig, ExperimentError, markdown_report, preset_config, run_experiment
from model_zoo.data import load_dataset, save_folders, shared_dataset_dir, shared_datasets_root

pytestmark = pytest.mark.e2e

METHODS = ("centralized", "local_mean", "local_worst", "fedavg", "fedprox", "fedavgm",
           "single_identity_fedavg", "single_identity_anchors")


@pytest.fixture(scope="module")
def tiny_orl(tmp_path_factory):
    """8 ORL identities, 3 images each, as a folder-per-identity dataset."""
    root = shared_dataset_dir("orl")
    if root is None:
        pytest.skip(f"shared dataset 'orl' absent under {shared_datasets_root()} (set FACEFED_DATA_ROOT)")
    orl = load_dataset(root)
    keep = np.flatnonzero((orl.labels < 8) & (np.arange(len(orl)) % 10 < 3))
    out = tmp_path_factory.mktemp("orl8x3")
    save_folders(orl.subset(keep), out)
    return out


def test_tiny_experiment_runs_every_arm_and_writes_the_report(tiny_orl, tmp_path):
    cfg = ExperimentConfig(data=[tiny_orl], out=tmp_path / "exp", clients=3, rounds=2, local_epochs=1,
                           batch_size=4, holdout=3, size_skew=2.0, single_identity_clients=3, negative_anchors=8,
                           threads=1, bn_statistics="measured")
    lines: list[str] = []
    results = run_experiment(cfg, say=lines.append, progress=True)
    out = cfg.out
    on_disk = json.loads((out / "results.json").read_text())
    assert set(METHODS) <= set(on_disk) and on_disk["summary"] == results["summary"]
    for name in METHODS:
        r = on_disk[name]
        assert 0 <= r["val_accuracy"] <= 1 and 0 <= r["eer"] <= 1 and 0 <= r["rank1"] <= 1, name
        assert set(r["tar_at_far"]) == {"1e-2", "1e-3", "1e-4"} and all(0 <= v <= 1 for v in r["tar_at_far"].values())
        assert [p["round"] for p in r["curve"]] == [0, 1, 2], name
    # One seeded starting model for every arm: round 0 scores the same everywhere, in-process or in the aggregator.
    start = on_disk["centralized"]["curve"][0]["val_accuracy"]
    assert all(on_disk[m]["curve"][0]["val_accuracy"] == pytest.approx(start, abs=1e-9) for m in METHODS)
    # The federated arms' final models are the ones the aggregator scored in its last round.
    assert on_disk["fedavg"]["curve"][-1]["val_accuracy"] == pytest.approx(on_disk["fedavg"]["val_accuracy"])
    assert on_disk["fedavg"]["client_updates"] == 2 * 3
    # Measured BatchNorm statistics: the same weights with the averaged statistics are scored too, as a row and
    # inside each federated arm.
    raw = on_disk["fedavg_averaged_bn"]
    assert raw["val_accuracy"] == pytest.approx(on_disk["fedavg"]["uncalibrated"]["val_accuracy"])
    assert raw["curve"][-1]["val_accuracy"] == pytest.approx(raw["val_accuracy"])
    assert [p["val_accuracy_uncalibrated"] for p in on_disk["fedavg"]["curve"]] == [p["val_accuracy"] for p in raw["curve"]]
    assert all("uncalibrated" in on_disk[m] for m in ("fedprox", "fedavgm", "single_identity_anchors"))
    assert "fedavg_averaged_bn_minus_local_mean_acc_pts" in on_disk["summary"]
    setup = on_disk["setup"]
    assert setup["holdout_identities"] == 3 and sum(setup["client_sizes"]) == 5 * 3
    assert setup["single_identity_sizes"] == [3, 3, 3] and setup["epochs_per_client"] == 2
    for name in ("accuracy_per_round.png", "roc.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert report == markdown_report(on_disk) and "FedProx" in report and "| centralized (pooled) |" in report
    assert any(line.startswith("[fedavg] round  2/2") for line in lines)
    # The arms' settings reach the aggregator, which announces them to the devices with each round.
    fedprox = load_aggregator_config(out / "runs" / "fedprox" / "aggregator.yaml")
    assert train_settings(fedprox).proximal_mu == 0.01
    fedavgm = yaml.safe_load((out / "runs" / "fedavgm" / "aggregator.yaml").read_text())
    assert fedavgm["strategy"] == "fedavgm" and fedavgm["bn_statistics"] == "measured"
    anchors = yaml.safe_load((out / "runs" / "single_identity_anchors" / "aggregator.yaml").read_text())["train"]
    assert anchors["negative_anchors"] == 8


def test_bad_settings_fail_clearly(tmp_path, capsys):
    with pytest.raises(ExperimentError, match="clients must be in"):
        ExperimentConfig(data=[tmp_path], out=tmp_path / "o", clients=2).check()
    with pytest.raises(ExperimentError, match="proximal_mu"):
        ExperimentConfig(data=[tmp_path], out=tmp_path / "o", proximal_mu=0).check()
    with pytest.raises(ExperimentError, match="no such dataset folder"):
        ExperimentConfig(data=[tmp_path / "nope"], out=tmp_path / "o").check()
    assert main(["experiment", "--preset", "quick", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--fraction-fit", "0"]) == 2
    assert "fraction_fit must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(ExperimentError, match="bn_statistics"):
        ExperimentConfig(data=[tmp_path], out=tmp_path / "o", bn_statistics="yes").check()


def test_presets_and_the_bn_statistics_switch(tmp_path):
    full = preset_config("full", tmp_path, tmp_path / "o")
    assert (full.rounds, full.local_epochs, full.clients, full.bn_statistics) == (10, 1, 6, "measured")
    assert full.single_identity_clients == 8 and "server" in full.methods
    assert preset_config("full", tmp_path, tmp_path / "o", bn_statistics="averaged").bn_statistics == "averaged"
    quick = preset_config("quick", tmp_path, tmp_path / "o")
    assert set(quick.methods) == {"centralized", "local", "fedavg", "fedprox"} and quick.single_identity_clients == 0
    assert quick.bn_statistics == "averaged"
    quick.data = [tmp_path]
    quick.check()
