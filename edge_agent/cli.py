"""facefed-agent: the on-device federated learning agent."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from edge_agent.unlock.calibration import ENROL_IMAGES
from fedwire.config import ConfigError
from model_zoo.vision import DEFAULT_DETECTOR, DEFAULT_LANDMARKS, DETECTORS, LANDMARK_MODELS

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
exit_when_finished: false         # true (or run --exit-when-finished): exit once the aggregator announces the end
aggregator_key: null              # the bundle's keys/aggregator-signing.pub: refuse unsigned or altered models
tls: {ca_cert: null, certfile: null, keyfile: null}   # with mqtts://: the bundle's tls/ca.crt, device.crt, device.key
max_clock_skew_s: 21600           # how far this device's clock may be off; older expired announcements are replays
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
    run.add_argument("--exit-when-finished", action="store_true",
                     help="exit with status 0 once the aggregator announces the federation finished (default, and "
                     "what a fleet device does: keep waiting for the next federation)")
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
    flash.add_argument("--out", required=True, type=Path,
                       help="a folder (the bundle is written as DIR/facefed-ID/) or NAME.tar.gz (holding facefed-ID/)")
    flash.add_argument("--topic-prefix", default="facefed")
    flash.add_argument("--model", type=Path, help="the deployed model to ship (e.g. an int8 .onnx export)")
    flash.add_argument("--wheel", type=Path, help="facefed-edge wheel to ship (default: build from this source)")
    flash.add_argument("--camera-bank", type=Path,
                       help="a door or corridor camera (aggregator train.method: camera): ship this public face bank "
                       "(aligned crops, a folder per identity) and set the device to train on the frames its unlocks "
                       "keep (docs/camera-domain.md)")
    flash.add_argument("--camera", default="measured",
                       help="with --camera-bank: what the device knows of its camera: measured (on the frames its "
                       "unlocks keep, against the enrolment), a domain with overrides (corridor, door-night, "
                       "'corridor,face_px=32'), or clean (default measured)")
    flash.add_argument("--keep-frames", type=int, default=200,
                       help="with --camera-bank: unlock frames kept per person to train on (default 200)")
    flash.add_argument("--target", help="ssh://user@host[:port]: copy the .tar.gz there and run install.sh")
    _add_unlock_parsers(sub)
    sub.add_parser("profiles", help="list the bundled device profiles")
    sub.add_parser("example-config", help="print a commented agent.yaml")
    return parser


def _add_unlock_parsers(sub) -> None:
    """enroll, unlock and calibrate: the face-unlock demo on this device's model (edge_agent.unlock)."""
    def common(parser: argparse.ArgumentParser, model_default: str) -> None:
        parser.add_argument("--config", type=Path, help="agent.yaml (or a YAML with an `unlock:` section): model, "
                            "store, threshold and decision rules")
        parser.add_argument("--model", help="a .onnx / .tflite export or .safetensors checkpoint, or 'faceapi' for "
                            f"the pretrained descriptor (default: {model_default})")
        parser.add_argument("--store", type=Path, help="template folder (default: unlock.store in --config, "
                            "else <state_dir>/unlock); created 0700, files 0600")
        parser.add_argument("--threads", type=int, default=1, help="CPU threads for the nets (default 1)")
        vision(parser)

    def score(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--score", choices=("auto", "cosine", "l2"), default="auto",
                            help="how faces compare with templates: cosine, or l2 (minus the euclidean distance of "
                            "the raw descriptors; the pretrained faceapi model only); auto: the model's measured "
                            "choice for unlock, cosine (BENCHMARKS.md, issue 16 unlock score). unlock uses the "
                            "enrolment's score; a threshold calibrated under the other is refused")

    def vision(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--detector", choices=DETECTORS, help="face detector: blazeface (MediaPipe BlazeFace, "
                            "TFLite) or tiny (the face-api port, torch) (default: the device profile's in --config, "
                            f"else {DEFAULT_DETECTOR})")
        parser.add_argument("--landmarks", choices=LANDMARK_MODELS, help="landmarks: mesh (MediaPipe Face Mesh, 468 "
                            "points, TFLite) or 68 (the face-api port, torch) (default: the device profile's, else "
                            f"{DEFAULT_LANDMARKS})")

    source_help = "camera index (0), video file, rtsp:// URL or folder of images"
    enroll = sub.add_parser(
        "enroll", help="store an owner's face templates for unlock",
        description="Read frames from SRC, keep the good ones (one face, large, sharp, frontal, eyes open) and store "
        "the owner's aligned face chips and their embeddings in the template store. Nothing leaves the device.")
    enroll.add_argument("--name", required=True, help="the owner's name (letters, digits, . _ -)")
    enroll.add_argument("--source", required=True, help=source_help)
    enroll.add_argument("--templates", type=int, default=ENROL_IMAGES,
                        help=f"templates to keep (default {ENROL_IMAGES}, what calibrate assumes)")
    enroll.add_argument("--max-frames", type=int, default=300, help="stop after this many frames (default 300)")
    enroll.add_argument("--fps", type=float, help="frame rate of an image folder (default 10)")
    enroll.add_argument("--aligned", action="store_true", help="the images are already ArcFace-aligned square crops "
                        "(such as celeb-dev): take each whole, no face detection")
    common(enroll, "the deployed model, unlock.model in --config, else faceapi")
    score(enroll)
    unlock = sub.add_parser(
        "unlock", help="run the face-unlock loop on a camera, video, stream or image folder",
        description="detect -> align -> embed -> compare with the enrolled owner -> decide, frame by frame. Unlocks "
        "after k matching frames of the last n with the liveness challenge passed; relocks when the owner has not "
        "been verified for --relock-after seconds (for files, time = frame index / fps). A window shows the result "
        "where a display exists; --save and --json-log record it headless.")
    unlock.add_argument("--source", required=True, help=source_help)
    unlock.add_argument("--liveness", choices=("off", "blink", "motion"),
                        help="challenge before unlocking: a blink (eye aspect ratio), a head turn left and right, "
                        "or none (default: unlock.liveness, blink)")
    unlock.add_argument("--relock-after", type=float, help="seconds without the owner before relocking (default 2)")
    unlock.add_argument("--threshold", type=float, help="score to accept, in the enrolment's score: a cosine, or "
                        "minus a distance under l2 (default: the calibrated unlock.threshold)")
    unlock.add_argument("--k", type=int, help="matching frames needed (default 3) ...")
    unlock.add_argument("--n", type=int, help="... among the last n frames with a face (default 5)")
    unlock.add_argument("--timeout", type=float, help="seconds before an attempt fails (default 10)")
    unlock.add_argument("--save", type=Path, help="write the annotated video here (.mp4 or .avi)")
    unlock.add_argument("--json-log", type=Path, help="one JSON object per processed frame (JSON lines)")
    unlock.add_argument("--no-window", action="store_true", help="never open a window")
    unlock.add_argument("--aligned", action="store_true", help="the frames are already ArcFace-aligned square crops: "
                        "take each whole, no face detection")
    unlock.add_argument("--fps", type=float, help="frame rate of an image folder (default 10), or an override")
    common(unlock, "the model the templates were made with; after a federated round, the new global model")
    calibrate = sub.add_parser(
        "calibrate", help="pick the unlock threshold for a target false-accept rate",
        description="Embed a folder of labelled faces (one folder per person) with the unlock model, score "
        "template trials as unlock compares faces (10 seeded random enrolments of 5 images per person, each template "
        "against every other image; people need at least 6 images), write ROC/DET curves of those trials to a PNG and the threshold for --target-far into the "
        "`unlock:` section of --config (created if absent; the YAML is rewritten without its comments).")
    calibrate.add_argument("--faces", required=True, type=Path, help="DIR/<person>/*.jpg|png|pgm")
    calibrate.add_argument("--config", required=True, type=Path, help="the device config to write the threshold to")
    calibrate.add_argument("--model", help="model to calibrate (default: unlock.model in --config, else faceapi)")
    calibrate.add_argument("--target-far", type=float, default=1e-3, help="false-accept rate (default 1e-3)")
    calibrate.add_argument("--plot", type=Path, help="ROC/DET PNG (default: unlock-calibration.png by --config)")
    calibrate.add_argument("--json", type=Path, help="also write the figures as JSON")
    calibrate.add_argument("--threads", type=int, default=1, help="CPU threads for the nets (default 1)")
    vision(calibrate)
    score(calibrate)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "example-config":
        sys.stdout.write(EXAMPLE_CONFIG)
        return 0
    if args.command == "flash":
        return _flash(args)
    if args.command in ("enroll", "unlock", "calibrate"):
        from edge_agent.unlock.commands import run_command

        return run_command(args)
    if args.command == "profiles":
        from firmware_configs import profile_names, profile_path

        for name in profile_names():
            print(f"{name}\t{profile_path(name)}")
        return 0
    return _run(args)


def _flash(args: argparse.Namespace) -> int:
    from edge_agent.flash import FlashError, FlashRequest, build_bundle, push_over_ssh

    request = FlashRequest(profile=args.profile, device_id=args.device_id, broker=args.broker, pki=args.pki,
                           out=args.out, topic_prefix=args.topic_prefix, model=args.model, wheel=args.wheel,
                           camera_bank=args.camera_bank, camera=args.camera, keep_frames=args.keep_frames)
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

    torch.set_num_threads(config.device.threads)
    try:
        trainer = _trainer(config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"facefed-agent: cannot load data from {config.data}: {exc}", file=sys.stderr)
        return 2
    try:
        EdgeAgent(config, trainer, progress=args.progress).run()
    except KeyboardInterrupt:
        return 130
    except ConnectionError as exc:
        print(f"facefed-agent: {exc}", file=sys.stderr)
        return 1
    return 0


def _trainer(config):
    """The trainer the config asks for: camera adaptation (camera_training set) or a classifier head."""
    if config.camera_training is not None:
        from edge_agent.camera_trainer import CameraTrainer, load_camera_data

        def data():  # read afresh each round: unlock keeps adding the owner's frames
            return load_camera_data(config.data, config.camera_training, config.unlock.store_dir(config.state_dir))

        return CameraTrainer(data, config.state_dir, config.seed, config.device.trunk_precision, config.device.threads)
    from edge_agent.trainer import LocalTrainer
    from model_zoo.data import load_dataset

    return LocalTrainer(load_dataset(config.data), config.state_dir, config.device.batch_size, config.augment,
                        config.seed, config.device.trunk_precision, config.device.threads)


if __name__ == "__main__":
    sys.exit(main())
