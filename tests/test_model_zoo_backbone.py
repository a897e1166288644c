"""MobileFaceNet shape/size/normalisation, the registry, and the ArcFace margin arithmetic."""
import math

import pytest
import torch

from model_zoo.backbones import BACKBONES, MobileFaceNet, backbone_spec, build_backbone
from model_zoo.losses import ArcFaceHead


@pytest.mark.parametrize("act", ["relu", "prelu"])
def test_mobilefacenet_size_and_unit_embeddings(act):
    torch.manual_seed(0)
    net = build_backbone("mobilefacenet", act=act).eval()
    params = sum(p.numel() for p in net.parameters())
    print(f"MobileFaceNet act={act}: {params:,} parameters")
    assert 0.8e6 <= params <= 1.3e6
    with torch.no_grad():
        out = net(torch.randn(3, 3, 112, 112))
    assert out.shape == (3, 128)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_prelu_option_really_uses_prelu():
    assert any(isinstance(m, torch.nn.PReLU) for m in MobileFaceNet(act="prelu").modules())
    assert not any(isinstance(m, torch.nn.PReLU) for m in MobileFaceNet(act="relu").modules())


def test_embedding_size_and_spec_round_trip():
    net = build_backbone(embedding_size=64, act="prelu")
    assert BACKBONES["mobilefacenet"] is MobileFaceNet
    name, kwargs = backbone_spec(net)
    assert (name, kwargs) == ("mobilefacenet", {"embedding_size": 64, "act": "prelu"})
    with torch.no_grad():
        assert build_backbone(name, **kwargs).eval()(torch.zeros(2, 3, 112, 112)).shape == (2, 64)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet9000")
    with pytest.raises(ValueError, match="act"):
        MobileFaceNet(act="gelu")


def _unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def _head_with_centres(angles: list[float], scale=10.0, margin=0.5) -> ArcFaceHead:
    head = ArcFaceHead(2, len(angles), scale=scale, margin=margin)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([_unit(a) for a in angles]))
    return head


def test_arcface_adds_angular_margin_to_target_only():
    # Class centres at 0 and 90 degrees; the embedding sits at 30 degrees: theta = 30 deg to class 0.
    head = _head_with_centres([0.0, math.pi / 2], scale=10.0, margin=0.5)
    emb = torch.tensor([_unit(math.radians(30))])
    logits = head(emb, torch.tensor([0]))
    expected_target = 10.0 * math.cos(math.radians(30) + 0.5)
    expected_other = 10.0 * math.cos(math.radians(60))
    torch.testing.assert_close(logits, torch.tensor([[expected_target, expected_other]]))
    torch.testing.assert_close(head.logits(emb), torch.tensor([[10.0 * math.cos(math.radians(30)), expected_other]]))


def test_arcface_falls_back_past_pi_minus_margin():
    # theta = 170 deg: theta + m > pi, so the target logit is s * (cos(theta) - m * sin(pi - m)) instead.
    head = _head_with_centres([0.0, math.pi / 2], scale=1.0, margin=0.5)
    emb = torch.tensor([_unit(math.radians(170))])
    target = head(emb, torch.tensor([0]))[0, 0].item()
    assert target == pytest.approx(math.cos(math.radians(170)) - 0.5 * math.sin(math.pi - 0.5), abs=1e-6)
    assert target < math.cos(math.radians(170))  # still a penalty, unlike cos(theta + m) would be here


def test_arcface_margin_logits_have_gradients_for_backbone_and_head():
    head = ArcFaceHead(128, 5)
    emb = torch.nn.functional.normalize(torch.randn(4, 128), dim=1).requires_grad_()
    loss = torch.nn.functional.cross_entropy(head(emb, torch.tensor([0, 1, 2, 3])), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert emb.grad is not None and head.weight.grad is not None
    assert torch.isfinite(emb.grad).all()
