"""facefed-aggregator: the fleet's aggregation service."""

from __future__ import annotations

import argparse
import logging
import sys

from fedwire.config import ConfigError

EXAMPLE_CONFIG = """\
# aggregator.yaml: every field is optional except state_dir.
state_dir: ./aggregator-state     # checkpoints per round + rounds.jsonl; a restart resumes here
broker: null                      # mqtt://host:1883 or mqtts://host:8883; null = embedded broker
embedded_port: 1883               # port of the embedded broker (127.0.0.1 only); 0 = any free port
topic_prefix: facefed
rounds: 10
min_clients: 2                    # quorum: the round closes as soon as this many updates are in
round_timeout_s: 600              # deadline: close with what arrived (or re-announce if nothing did)
max_chunk_bytes: 262144           # largest MQTT payload we publish (many brokers cap message size)
model: {arch: mobilefacenet, act: relu, embedding_size: 128, seed: 0}
# pretrained face-api ResNet, last stage + projection fine-tuned (weights: $FACEFED_FACEAPI_DIR on every machine):
# model: {arch: faceapi-resnet, options: {trainable: last}}   with train: {lr: 0.0001, margin: 0.1}
train: {local_epochs: 1, lr: 0.05, momentum: 0.9, weight_decay: 0.0005, margin: 0.5}
eval: {data: null, every: 1}      # folder of held-out identities: accuracy per round in the log
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facefed-aggregator",
        description="Run the FedAvg aggregator of a FaceFed Edge fleet: it announces rounds over MQTT, "
        "collects backbone updates from devices, averages them weighted by sample count and publishes "
        "the new global model (retained).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the aggregation service until all rounds are done",
                           description="Run rounds until `rounds` are complete; resumes from state_dir.")
    serve.add_argument("--config", required=True, help="aggregator.yaml (see `example-config`)")
    serve.add_argument("--broker", help="override the config's broker URL")
    serve.add_argument("--rounds", type=int, help="override the number of rounds")
    sub.add_parser("example-config", help="print a commented aggregator.yaml")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "example-config":
        sys.stdout.write(EXAMPLE_CONFIG)
        return 0
    from aggregator.config import load_aggregator_config
    from aggregator.service import AggregatorService

    overrides = {k: v for k, v in {"broker": args.broker, "rounds": args.rounds}.items() if v is not None}
    try:
        config = load_aggregator_config(args.config, overrides)
    except ConfigError as exc:
        print(f"facefed-aggregator: bad config: {exc}", file=sys.stderr)
        return 2
    try:
        AggregatorService(config).run()
    except KeyboardInterrupt:
        return 130
    except ConnectionError as exc:
        print(f"facefed-aggregator: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
