"""The aggregator's model side (torch, data sets, exporters): the engine's `ModelHooks` for a config.

The round engine (aggregator/rounds.py) works on numpy tensors only; this builds the initial model,
evaluates a global model on the held-out identities and exports checkpoints in deployable formats.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.dp import DpStrategy, with_dp
from aggregator.strategies import build_strategy
from fedwire.compression import TOPK_INT8_DELTA
from fedwire.messages import TrainSettings
from model_zoo.backbones import MACHINE_LOCAL_KWARGS, build_backbone
from model_zoo.checkpoint import load_checkpoint, load_shared_tensors, shared_tensors, spec_of

log = logging.getLogger("facefed.aggregator")


def train_settings(config: AggregatorConfig) -> TrainSettings:
    """What every round announces: the train: section plus the codecs and the model devices must use."""
    m = config.model
    return dataclasses.replace(
        config.train,
        codec=config.update_codec,
        codec_topk=config.update_topk if config.update_codec == TOPK_INT8_DELTA else None,
        download_codec=config.download_codec,
        # Devices build the same backbone from this before loading the global tensors.
        model={"arch": m.arch, **{k: v for k, v in m.backbone_kwargs().items() if k not in MACHINE_LOCAL_KWARGS}},
    )


def strategy_for(config: AggregatorConfig, dp_rng: np.random.Generator | None = None):
    """(strategy, its DpStrategy wrapper or None): the config's strategy, with differential privacy if asked
    (dp_rng: see with_dp)."""
    strategy = with_dp(build_strategy(config.strategy, train_settings(config).to_dict(), config.clip_norm,
                                      config.trim_fraction, config.server_lr), config, dp_rng)
    return strategy, strategy if isinstance(strategy, DpStrategy) else None


class FaceModels:
    """ModelHooks of the face backbone a config names."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.backbone = build_backbone(config.model.arch, **config.model.backbone_kwargs())
        self.spec = spec_of(self.backbone)
        self.train_settings = train_settings(config)
        self._eval_data = None

    def update_bytes(self) -> int:
        """The size of one plain update (the devices' budgets are derived from it)."""
        return sum(value.nbytes for value in shared_tensors(self.backbone).values())

    def initial_tensors(self) -> dict[str, np.ndarray]:
        model = self.config.model
        if model.init_checkpoint is not None:
            backbone, _ = load_checkpoint(model.init_checkpoint)
            return shared_tensors(backbone)
        import torch

        torch.manual_seed(model.seed)
        return shared_tensors(build_backbone(model.arch, **model.backbone_kwargs()))

    def evaluate(self, round_number: int, tensors: dict[str, np.ndarray]) -> dict[str, float]:
        eval_cfg = self.config.eval
        if eval_cfg.data is None or round_number % eval_cfg.every:
            return {}
        from model_zoo.data import load_dataset
        from model_zoo.evaluate import evaluate_backbone

        if self._eval_data is None:
            self._eval_data = load_dataset(eval_cfg.data)
        load_shared_tensors(self.backbone, tensors)
        report = evaluate_backbone(self.backbone, self._eval_data)
        metrics = {"val_accuracy": report["accuracy"], "eer": report["eer"], "rank1": report["rank1"]}
        metrics.update({f"tar_at_far_{k}": v for k, v in report["tar_at_far"].items()})
        return metrics

    def export(self, checkpoint: Path) -> None:
        """Write the new global model in each configured deployable format; a failure never stops the fleet."""
        export = self.config.export
        if not export.formats:
            return
        from model_zoo.export import export_model

        for fmt in export.formats:
            try:
                result = export_model(checkpoint, fmt, Path(self.config.state_dir) / "exports", export.calibration)
            except Exception as exc:  # an exporter bug must not stop training rounds
                log.error("export of %s as %s failed: %s", checkpoint.name, fmt, exc)
            else:
                log.info("exported %s", result.model_path)
