"""facefed-agent: the on-device federated learning agent."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedwire.config import ConfigError

EXAMPLE_CONFIG = """\
# agent.yaml: device_id, data and state_dir are required.
device_id: cam-01                 # letters, digits, . _ - (also the MQTT client id suffix)
data: ./faces                     # this device's labelled faces: ORL, Yale or one folder per person
state_dir: ./agent-state          # private classifier head; nothing here is ever uploaded
profile: x86-dev                  # a bundled profile (see `facefed-agent profiles`) or a YAML path
broker: mqtt://127.0.0.1:1883     # or mqtts://host:8883
topic_prefix: facefed
device:                           # overrides of the profile's fields
  threads: 2
exit_when_finished: false         # true: exit once the aggregator announces the end
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facefed-agent",
        description="FaceFed Edge device agent: trains the shared face-embedding backbone on this device's own "
        "faces when the aggregator opens a round, and uploads only the backbone weights over MQTT.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="join the federation and train in each round",
                         description="Connect, wait for rounds, train, upload; reconnects after broker loss.")
    run.add_argument("--config", required=True, help="agent.yaml (see `example-config`)")
    run.add_argument("--broker", help="override the broker URL")
    run.add_argument("--exit-when-finished", action="store_true", help="exit once the federation is finished")
    run.add_argument("--progress", action="store_true", help="show a progress bar per local epoch")
    flash = sub.add_parser(
        "flash", help="build a device bundle (config, certificates, model, installer) and optionally push it",
        description="Write everything a provisioned device needs into --out (a folder, or NAME.tar.gz): the merged "
        "agent config, the device's certificate and key, the fleet CA, the aggregator's model-signing public key, the "
        "current model, the facefed-edge wheel, a systemd unit and install.sh. Provision the device first with "
        "`facefed-aggregator provision DEVICE_ID --dir PKI`.")
    flash.add_argument("--profile", required=True, help="device profile name (see `profiles`) or YAML path")
    flash.add_argument("--device-id", required=True, help="the id the device was provisioned with")
    flash.add_argument("--broker", required=True, help="mqtts://HOST:8883 as the device will reach it")
    flash.add_argument("--pki", required=True, type=Path, help="the fleet PKI folder")
    flash.add_argument("--out", required=True, type=Path, help="bundle folder, or a .tar.gz file")
    flash.add_argument("--topic-prefix", default="facefed")
    flash.add_argument("--model", type=Path, help="the deployed model to ship (e.g. an int8 .onnx export)")
    flash.add_argument("--wheel", type=Path, help="facefed-edge wheel to ship (default: build from this source)")
    flash.add_argument("--target", help="ssh://user@host[:port]: copy the .tar.gz there and run install.sh")
    sub.add_parser("profiles", help="list the bundled device profiles")
    sub.add_parser("example-config", help="print a commented agent.yaml")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "example-config":
        sys.stdout.write(EXAMPLE_CONFIG)
        return 0
    if args.command == "flash":
        return _flash(args)
    if args.command == "profiles":
        from firmware_configs import profile_names, profile_path

        for name in profile_names():
            print(f"{name}\t{profile_path(name)}")
        return 0
    return _run(args)


def _flash(args: argparse.Namespace) -> int:
    from edge_agent.flash import FlashError, FlashRequest, build_bundle, push_over_ssh

    request = FlashRequest(profile=args.profile, device_id=args.device_id, broker=args.broker, pki=args.pki,
                           out=args.out, topic_prefix=args.topic_prefix, model=args.model, wheel=args.wheel)
    try:
        bundle = build_bundle(request)
        print(f"bundle for {args.device_id} written to {bundle}")
        if args.target:
            push_over_ssh(bundle, args.target)
            print(f"installed on {args.target}")
    except (FlashError, FileNotFoundError, ValueError) as exc:
        print(f"facefed-agent flash: {exc}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> int:
    from edge_agent.config import load_agent_config

    overrides = {}
    if args.broker:
        overrides["broker"] = args.broker
    if args.exit_when_finished:
        overrides["exit_when_finished"] = True
    try:
        config = load_agent_config(args.config, overrides)
    except ConfigError as exc:
        print(f"facefed-agent: bad config: {exc}", file=sys.stderr)
        return 2
    import torch

    from edge_agent.agent import EdgeAgent
    from edge_agent.trainer import LocalTrainer
    from model_zoo.data import load_dataset

    torch.set_num_threads(config.device.threads)
    try:
        dataset = load_dataset(config.data)
    except (ValueError, FileNotFoundError) as exc:
        print(f"facefed-agent: cannot load data from {config.data}: {exc}", file=sys.stderr)
        return 2
    trainer = LocalTrainer(dataset, config.state_dir, config.device.batch_size, config.augment, config.seed)
    try:
        EdgeAgent(config, trainer, progress=args.progress).run()
    except KeyboardInterrupt:
        return 130
    except ConnectionError as exc:
        print(f"facefed-agent: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
