"""facefed-aggregator: the fleet's aggregation service."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from aggregator.broker_config import BrokerLimits
from fedwire.config import ConfigError

DEFAULT_LIMITS = BrokerLimits()

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
signing_key: null                 # pki/aggregator/signing.key: sign every global model and round (set it in a fleet)
tls: {ca_cert: null, certfile: null, keyfile: null}   # with mqtts://: pki/ca.crt, pki/aggregator/client.crt, client.key
model: {arch: mobilefacenet, act: relu, embedding_size: 128, seed: 0}
# pretrained face-api ResNet, last stage + projection fine-tuned (weights: $FACEFED_FACEAPI_DIR on every machine):
# model: {arch: faceapi-resnet, options: {trainable: last}}   with train: {lr: 0.0001, margin: 0.0}
train: {local_epochs: 1, lr: 0.05, momentum: 0.9, weight_decay: 0.0005, margin: 0.5}
eval:                             # held-out scores per round in rounds.jsonl and the summary
  data: null                      # a folder of held-out identities (ORL, Yale or one folder per person)
  every: 1                        # evaluate every N rounds
bn_statistics: averaged           # or measured: devices measure BatchNorm statistics on each averaged model
export: {formats: [], calibration: null}   # e.g. [onnx, onnx-int8]: state_dir/exports after each round
shard_workers: 1                  # > 1: `serve` reduces, W `worker`s share the updates (MQTT 5 broker; docs/scale-out.md)
device_budget: {transfers: 4, messages: null, bytes: null}   # per device and round, then dropped; null = from the model
revoked_devices: null             # e.g. pki/revoked.txt (`revoke` writes it): those devices' messages are dropped
# n_k (num_samples) is a device's claim. samples: weight n_k, a claim above the cap is rejected; capped: weight
# min(n_k, cap), a claim above is clamped (logged); uniform: every update weighs 1. median and trimmed_mean ignore
# weights; clip_norm bounds the step, the cap the weight. Default cap: the faces an 8 GB device can hold.
max_samples_per_update: 250000
weighting: samples                # samples | capped | uniform (PROTOCOL.md 4.2.1)
dashboard: {listen: null}         # e.g. 127.0.0.1:8080 (or serve --dashboard); beyond loopback add token_file or https
# Differential privacy (DP-FedAvg; README, Privacy): updates clipped to clip, Gaussian noise of std
# noise_multiplier * clip on their sum, equal weights; epsilon at delta logged per round. Off when absent.
# dp: {noise_multiplier: 1.0, clip: 1.0, mode: central, delta: 1.0e-5, epsilon_budget: 8.0}
#     mode distributed: each device adds its share of the noise; adaptive: {target_quantile: 0.5} (central only)
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
    serve.add_argument("--spawn-workers", action="store_true",
                       help="with shard_workers > 1: also start the shard workers on this machine (otherwise "
                       "start each with `facefed-aggregator worker --index I`, on any machine)")
    worker = sub.add_parser("worker", help="one shard worker of a sharded aggregator (shard_workers > 1)",
                            description="Aggregate the updates of the devices this worker owns (crc32(device id) "
                            "modulo shard_workers) from an MQTT 5 shared subscription, and hand the partial sum to "
                            "`serve` at the end of each round. See docs/scale-out.md.")
    worker.add_argument("--config", required=True, help="the same aggregator.yaml as `serve`")
    worker.add_argument("--index", required=True, type=int, help="this worker's index, 0 .. shard_workers-1")
    worker.add_argument("--broker", help="override the config's broker URL")
    sub.add_parser("example-config", help="print a commented aggregator.yaml")
    _add_dashboard_options(serve, sub)
    _add_pki_commands(sub)
    return parser


def _add_dashboard_options(serve: argparse.ArgumentParser, sub: argparse._SubParsersAction) -> None:
    listen_help = ("HOST:PORT (or PORT, on 127.0.0.1) for the read-only fleet dashboard; beyond loopback the "
                   "config's dashboard section must set a token or https with client certificates")
    serve.add_argument("--dashboard", metavar="HOST:PORT", type=_listen,
                       help=f"also serve the fleet dashboard from a sibling process: {listen_help}")
    dashboard = sub.add_parser(
        "dashboard", help="serve the live fleet dashboard (devices, rounds, model versions) and its JSON API",
        description="A read-only web page and JSON API (/api/status, /api/devices, /api/rounds) built from what "
        "the fleet publishes on the broker and from state_dir/rounds.jsonl; it shares nothing else with "
        "`serve`. See docs/operators.md#fleet-dashboard.")
    dashboard.add_argument("--config", required=True, help="the same aggregator.yaml as `serve`")
    dashboard.add_argument("--listen", metavar="HOST:PORT", type=_listen,
                           help=f"override dashboard.listen: {listen_help}")
    dashboard.add_argument("--broker", help="override the config's broker URL")
    dashboard.add_argument("--exit-with-parent", action="store_true",
                           help="stop once the process that started it exits (`serve --dashboard` starts it so)")


def _listen(text: str) -> str:
    from aggregator.config import parse_listen

    try:
        parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _add_pki_commands(sub: argparse._SubParsersAction) -> None:
    ca = sub.add_parser("ca", help="the fleet's certificate authority: `ca init` once per fleet, `ca broker-cert`",
                        description="Manage the fleet CA that signs the broker's, the aggregator's and "
                        "every device's certificate.")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    init = ca_sub.add_parser(
        "init", help="create the CA, the broker certificate and the aggregator's identity",
        description="Create PKI/ca.crt + ca.key (keep ca.key on this machine only), the broker's TLS "
        "certificate (PKI/broker/), and the aggregator's client certificate and Ed25519 model-signing "
        "key (PKI/aggregator/). Refuses to run where a CA already exists. Private keys are written 0600.")
    init.add_argument("--dir", required=True, metavar="PKI", help="PKI directory to create (e.g. ./pki)")
    _add_broker_name_args(init)
    init.set_defaults(pki_command=_ca_init)
    broker_cert = ca_sub.add_parser(
        "broker-cert", help="re-issue the broker certificate for other hostnames or addresses",
        description="Replace PKI/broker/server.crt and server.key, e.g. when the broker moves to another "
        "host; run broker-config again afterwards. Devices need nothing new: they trust the CA.")
    broker_cert.add_argument("--dir", required=True, metavar="PKI", help="PKI directory made by `ca init`")
    _add_broker_name_args(broker_cert)
    broker_cert.set_defaults(pki_command=_ca_broker_cert)
    provision = sub.add_parser(
        "provision", help="issue a device's client certificate (CN = device id)",
        description="Write PKI/devices/DEVICE_ID.crt and .key. The broker takes the certificate's CN as "
        "the device's username, so the device may publish only to its own update and status topics.")
    provision.add_argument("device_id", metavar="DEVICE_ID",
                           help="1 to 64 characters of [A-Za-z0-9_.-], starting with a letter or digit")
    provision.add_argument("--dir", required=True, metavar="PKI", help="PKI directory made by `ca init`")
    provision.set_defaults(pki_command=_provision)
    revoke = sub.add_parser(
        "revoke", help="revoke a device: its certificate goes on the CRL, its id on the revoked list",
        description="Add PKI/devices/DEVICE_ID.crt to PKI/crl.pem (signed by the fleet CA) and DEVICE_ID to "
        "PKI/revoked.txt. With --broker-dir, also copy the CRL into a broker-config folder; then send mosquitto "
        "SIGHUP (`kill -HUP PID` or `systemctl reload mosquitto`): it refuses the device's new connections. "
        "A connection already open stays until it drops, so point aggregator.yaml's revoked_devices at "
        "revoked.txt as well: the aggregator re-reads it when it changes and drops every message of a revoked "
        "device.")
    revoke.add_argument("device_id", metavar="DEVICE_ID", help="a device provisioned with `provision`")
    revoke.add_argument("--dir", required=True, metavar="PKI", help="PKI directory made by `ca init`")
    revoke.add_argument("--broker-dir", metavar="DIR", help="a folder written by `broker-config`: update its crl.pem")
    revoke.set_defaults(pki_command=_revoke)
    broker = sub.add_parser(
        "broker-config", help="write a hardened Mosquitto config and ACL",
        description="Write DIR/mosquitto.conf, DIR/acl and copies of the CA certificate and the broker's "
        "certificate and key (never the CA key): one TLS listener, client certificates required, the "
        "certificate CN as username, devices limited to their own topics, only the aggregator publishing "
        "rounds and global models. Run `mosquitto -c DIR/mosquitto.conf` (mosquitto 2.x); DIR/server.key is "
        "0600, so make it readable by the user mosquitto runs as (`chown mosquitto DIR/server.key`).")
    broker.add_argument("--pki", required=True, metavar="PKI", help="PKI directory made by `ca init`")
    broker.add_argument("--out", required=True, metavar="DIR",
                        help="directory for the broker's files (created if missing)")
    broker.add_argument("--port", type=int, default=8883, help="TLS port (default 8883)")
    broker.add_argument("--topic-prefix", default="facefed", help="the federation's topic prefix (default facefed)")
    broker.add_argument("--bind", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every IPv4 interface)")
    broker.add_argument("--max-chunk-bytes", type=int, default=DEFAULT_LIMITS.max_chunk_bytes,
                        help="the fleet's chunk size (aggregator.yaml max_chunk_bytes, default %(default)s): "
                        "larger messages are dropped, much larger ones disconnect their sender")
    broker.add_argument("--max-queued-mb", type=int, default=DEFAULT_LIMITS.max_queued_bytes >> 20,
                        help="MiB mosquitto queues for one client, the aggregator above all (default %(default)s): "
                        "at least the updates of the devices that upload at the same moment")
    broker.set_defaults(pki_command=_broker_config)


def _add_broker_name_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker-host", action="append", metavar="NAME", type=_hostname,
                        help="DNS name devices use to reach the broker; repeatable (default localhost)")
    parser.add_argument("--broker-ip", action="append", metavar="IP", type=_ip,
                        help="IP address devices use to reach the broker; repeatable (default 127.0.0.1)")


def _hostname(text: str) -> str:
    from aggregator.pki import PkiError, check_hostname

    try:
        return check_hostname(text)
    except PkiError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ip(text: str) -> str:
    from aggregator.pki import PkiError, check_ip

    try:
        check_ip(text)
    except PkiError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _run_pki_command(args: argparse.Namespace) -> int:
    from aggregator.pki import PkiError

    try:
        created = args.pki_command(args)
    except PkiError as exc:
        print(f"facefed-aggregator: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a bad port, bind address or topic prefix
        print(f"facefed-aggregator: {exc}", file=sys.stderr)
        return 2
    for path in created:
        print(f"wrote {path}")
    return 0


def _ca_init(args: argparse.Namespace) -> list[Path]:
    from aggregator import pki

    ca = pki.init_ca(args.dir)
    server = pki.issue_server_cert(args.dir, args.broker_host or ["localhost"], args.broker_ip or ["127.0.0.1"])
    identity = pki.issue_aggregator_identity(args.dir)
    return [ca.cert, ca.key, server.cert, server.key, identity.client.cert, identity.client.key,
            identity.signing_key, identity.signing_pub]


def _ca_broker_cert(args: argparse.Namespace) -> list[Path]:
    from aggregator import pki

    server = pki.issue_server_cert(args.dir, args.broker_host or ["localhost"], args.broker_ip or ["127.0.0.1"],
                                   replace=True)
    return [server.cert, server.key]


def _provision(args: argparse.Namespace) -> list[Path]:
    from aggregator import pki

    device = pki.issue_device_cert(args.dir, args.device_id)
    return [device.cert, device.key]


def _revoke(args: argparse.Namespace) -> list[Path]:
    from aggregator import pki
    from aggregator.broker_config import install_crl

    if args.broker_dir is not None and not Path(args.broker_dir).is_dir():
        raise pki.PkiError(f"{args.broker_dir} is not a folder written by `broker-config`")
    written = pki.revoke_device(args.dir, args.device_id)
    if args.broker_dir is not None:
        written.append(install_crl(args.dir, args.broker_dir))
    return written


def _broker_config(args: argparse.Namespace) -> list[Path]:
    from aggregator.broker_config import write_broker_config

    limits = BrokerLimits(max_chunk_bytes=args.max_chunk_bytes, max_queued_bytes=args.max_queued_mb << 20)
    files = write_broker_config(args.pki, args.out, args.port, args.topic_prefix, args.bind, limits)
    return [files.config, files.acl]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "example-config":
        sys.stdout.write(EXAMPLE_CONFIG)
        return 0
    if hasattr(args, "pki_command"):
        return _run_pki_command(args)
    from aggregator.config import load_aggregator_config
    from aggregator.service import AggregatorService
    from model_zoo.checkpoint import CheckpointError
    from aggregator.validation import UnsafeModel

    overrides = {k: v for k, v in {"broker": getattr(args, "broker", None), "rounds": getattr(args, "rounds", None),
                                   "dashboard": _dashboard_override(args)}.items() if v is not None}
    try:
        config = load_aggregator_config(args.config, overrides)
    except ConfigError as exc:
        print(f"facefed-aggregator: bad config: {exc}", file=sys.stderr)
        return 2
    if args.command == "worker" and not 0 <= args.index < config.shard_workers:
        print(f"facefed-aggregator: --index {args.index} is not in [0, shard_workers={config.shard_workers})",
              file=sys.stderr)
        return 2
    if args.command == "dashboard":
        from aggregator.dashboard import run_dashboard

        try:
            run_dashboard(config, args.exit_with_parent)
        except (OSError, ValueError) as exc:  # the port is taken; verify_key is not an Ed25519 public key
            print(f"facefed-aggregator: {exc}", file=sys.stderr)
            return 1
        return 0
    dashboard = None
    if args.command == "serve" and config.dashboard.listen:  # from the config, or --dashboard
        from aggregator.dashboard import spawn_dashboard

        dashboard = spawn_dashboard(Path(args.config), config.dashboard.listen,
                                    ["--broker", args.broker] if args.broker else [])
    try:
        if args.command == "worker":
            from aggregator.sharded import ShardWorker

            ShardWorker(config, args.index).run()
        elif config.shard_workers > 1:
            from aggregator.sharded import run_sharded

            spawn = ["--broker", config.broker] if args.spawn_workers else []
            run_sharded(config, Path(args.config) if args.spawn_workers else None, spawn)
        else:
            AggregatorService(config).run()
    except KeyboardInterrupt:
        return 130
    except ConnectionError as exc:
        print(f"facefed-aggregator: {exc}", file=sys.stderr)
        return 1
    except CheckpointError as exc:  # a checkpoint in state_dir cut short (disk full, power loss) or damaged
        print(f"facefed-aggregator: cannot resume: {exc}; move that file away to resume from the round before",
              file=sys.stderr)
        return 2
    except UnsafeModel as exc:  # e.g. a resumed checkpoint holding NaN: nothing was published
        print(f"facefed-aggregator: {exc}", file=sys.stderr)
        return 1
    finally:
        if dashboard is not None:
            dashboard.terminate()
            try:
                dashboard.wait(timeout=10)
            except subprocess.TimeoutExpired:
                dashboard.kill()
    return 0


def _dashboard_override(args: argparse.Namespace) -> dict | None:
    listen = getattr(args, "dashboard", None) or getattr(args, "listen", None)
    return {"listen": listen} if listen else None


if __name__ == "__main__":
    sys.exit(main())
