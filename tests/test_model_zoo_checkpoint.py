"""Shared tensors (the federated payload) and safetensors checkpoints."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from model_zoo.backbones import build_backbone
from model_zoo.checkpoint import load_checkpoint, load_shared_tensors, save_checkpoint, shared_tensors


def _trained_looking_backbone(act="relu"):
    torch.manual_seed(1)
    net = build_backbone(act=act, embedding_size=32)
    net.train()
    with torch.no_grad():  # move BN running stats away from their init values
        net(torch.randn(4, 3, 112, 112))
    return net.eval()


def test_shared_tensors_are_float_and_include_bn_stats():
    net = _trained_looking_backbone()
    tensors = shared_tensors(net)
    assert not any(name.endswith("num_batches_tracked") for name in tensors)
    assert any(name.endswith("running_mean") for name in tensors)
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in tensors.values())
    float_state = [n for n, t in net.state_dict().items() if t.is_floating_point()]
    assert sorted(tensors) == sorted(float_state)


def test_load_shared_tensors_copies_and_is_strict():
    source, target = _trained_looking_backbone(), build_backbone(embedding_size=32).eval()
    tensors = shared_tensors(source)
    load_shared_tensors(target, tensors)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x))
    tensors["features.0.0.weight"][...] = 0  # a copy: changing it must not touch the model
    assert target.state_dict()["features.0.0.weight"].abs().sum() > 0
    with pytest.raises(ValueError, match="missing"):
        load_shared_tensors(target, {k: v for k, v in tensors.items() if k != "bn.weight"})
    with pytest.raises(ValueError, match="unexpected"):
        load_shared_tensors(target, {**tensors, "extra": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match="shapes"):
        load_shared_tensors(target, {**tensors, "bn.weight": np.zeros(3, np.float32)})


@pytest.mark.filterwarnings("error")
def test_load_shared_tensors_accepts_read_only_buffers():
    # Tensors decoded from received bytes are typically read-only views (np.frombuffer).
    source, target = _trained_looking_backbone(), build_backbone(embedding_size=32)
    tensors = {k: np.frombuffer(v.tobytes(), v.dtype).reshape(v.shape) for k, v in shared_tensors(source).items()}
    load_shared_tensors(target, tensors)
    assert torch.equal(target.state_dict()["bn.running_var"], source.state_dict()["bn.running_var"])


def test_checkpoint_round_trip_rebuilds_architecture(tmp_path):
    net = _trained_looking_backbone(act="prelu")
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, net, {"round": 3, "note": "ünïcode"})
    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata()
    assert metadata["format"] == "facefed-checkpoint" and metadata["arch"] == "mobilefacenet"
    assert json.loads(metadata["arch_kwargs"]) == {"embedding_size": 32, "act": "prelu"}
    loaded, meta = load_checkpoint(path)
    assert meta == {"round": 3, "note": "ünïcode"}
    assert not loaded.training
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    assert not list(tmp_path.glob("*.tmp"))


def test_foreign_safetensors_file_is_rejected(tmp_path):
    from safetensors.numpy import save_file
    path = tmp_path / "other.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, str(path))
    with pytest.raises(ValueError, match="facefed-checkpoint"):
        load_checkpoint(path)


def test_the_numpy_writer_gives_the_bytes_torch_writes_and_the_agent_loads_them(tmp_path):
    """The aggregator writes checkpoints from numpy (model_zoo.checkpoint_file), never from an nn.Module."""
    from model_zoo.checkpoint import spec_of
    from model_zoo.checkpoint_file import read_checkpoint, write_checkpoint

    net = _trained_looking_backbone()
    save_checkpoint(tmp_path / "torch.safetensors", net, {"round": 3})
    # Tensors as the aggregator holds them: a fresh dict in another order, read-only arrays of the wire.
    tensors = {name: np.frombuffer(value.tobytes(), value.dtype).reshape(value.shape)
               for name, value in reversed(list(shared_tensors(net).items()))}
    write_checkpoint(tmp_path / "numpy.safetensors", tensors, spec_of(net), {"round": 3})
    # Byte for byte but for the order of the metadata keys (safetensors keeps them in a hash map).
    files = [(tmp_path / name).read_bytes() for name in ("numpy.safetensors", "torch.safetensors")]
    (header_numpy, data_numpy), (header_torch, data_torch) = [_split_safetensors(b) for b in files]
    assert header_numpy == header_torch and data_numpy == data_torch
    loaded, meta = load_checkpoint(tmp_path / "numpy.safetensors")
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    assert meta == {"round": 3} and read_checkpoint(tmp_path / "numpy.safetensors")[1] == spec_of(net)


def _split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    """(header, tensor data) of a safetensors file: an 8-byte length, that much JSON, then the data."""
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + size]), blob[8 + size:]
