"""The command-line front doors: help texts, missing data, bad configs."""

import subprocess
from pathlib import Path
import sys

import pytest

import facefed.cli
import model_zoo.data
from aggregator.cli import main as aggregator_main
from edge_agent.cli import main as agent_main


@pytest.mark.parametrize("module", ["facefed.cli", "aggregator", "edge_agent"])
def test_help_explains_every_entry_point(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True).stdout
    assert "usage:" in out and len(out) > 300


def test_simulate_without_data_says_where_it_looked(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("FACEFED_DATA", raising=False)
    nowhere = [tmp_path / "a" / "orl", tmp_path / "b" / "orl"]
    monkeypatch.setattr(model_zoo.data, "candidate_data_roots", lambda: nowhere)
    assert facefed.cli.main(["simulate", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "no face dataset found" in err
    for place in nowhere:
        assert str(place) in err
    assert "--data" in err and "FACEFED_DATA" in err
    assert not (tmp_path / "run").exists()


def test_simulate_with_missing_data_folder(tmp_path, capsys):
    assert facefed.cli.main(["simulate", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "no such dataset folder" in capsys.readouterr().err


def test_bad_configs_fail_at_start_with_field_and_reason(tmp_path, capsys):
    agg = tmp_path / "aggregator.yaml"
    agg.write_text("state_dir: s\nmin_clients: 0\n")
    assert aggregator_main(["serve", "--config", str(agg)]) == 2
    assert "min_clients: must be >= 1" in capsys.readouterr().err
    agent = tmp_path / "agent.yaml"
    agent.write_text(f"device_id: d1\ndata: {tmp_path}\nstate_dir: s\ndevice:\n  batch_size: big\n")
    assert agent_main(["run", "--config", str(agent)]) == 2
    assert "device.batch_size: expected an integer, got 'big'" in capsys.readouterr().err


def test_example_configs_are_valid(tmp_path, capsys):
    from aggregator.config import load_aggregator_config
    from edge_agent.config import load_agent_config

    assert aggregator_main(["example-config"]) == 0
    (tmp_path / "aggregator.yaml").write_text(capsys.readouterr().out)
    assert load_aggregator_config(tmp_path / "aggregator.yaml").rounds == 10
    assert agent_main(["example-config"]) == 0
    (tmp_path / "faces").mkdir()
    (tmp_path / "agent.yaml").write_text(capsys.readouterr().out)
    assert load_agent_config(tmp_path / "agent.yaml").device_id == "cam-01"


def test_run_folder_configs_work_from_a_relative_out(tmp_path, monkeypatch):
    import numpy as np

    from aggregator.config import load_aggregator_config
    from edge_agent.config import load_agent_config
    from facefed.simulate import SimulationConfig, prepare_partitions, write_run_folder
    from model_zoo.data import FaceDataset

    monkeypatch.chdir(tmp_path)
    faces = FaceDataset(np.zeros((12, 112, 112, 3), np.uint8), np.repeat(np.arange(6), 2), [f"p{i}" for i in range(6)])
    cfg = SimulationConfig(data=[], out=Path("runs/demo"), clients=2, holdout=2)
    clients, holdout = prepare_partitions(faces, cfg)
    aggregator_yaml, agent_yamls = write_run_folder(cfg, clients, holdout, "mqtt://127.0.0.1:1", "facefed/t")
    assert load_aggregator_config(aggregator_yaml).eval.data == tmp_path / "runs/demo/eval/holdout"
    for k, path in enumerate(agent_yamls):
        assert load_agent_config(path).data == tmp_path / f"runs/demo/clients/client-{k}/data"
