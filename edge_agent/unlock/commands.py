"""The enroll, unlock and calibrate commands behind edge_agent.cli: settings from the command line and the
device config, the model, the store; each returns the process exit code."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fedwire.config import ConfigError
from model_zoo.vision import DEFAULT_DETECTOR, DEFAULT_LANDMARKS

from .analyzer import PRETRAINED, FaceAnalyzer, load_model
from .decision import DecisionRules
from .liveness import make_challenge
from .store import FrameStore, StoreError, TemplateStore

log = logging.getLogger("facefed.unlock")

# Thresholds of the pretrained face-api descriptor at FAR 1e-3 on template trials of 25 ORL + celeb-dev calibration
# people through BlazeFace + mesh (bench/unlock_score.py: cosine 0.9389 float, 0.9400 int8 export; l2 -0.4829), each
# rounded up (stricter). Used only when the config has no calibrated threshold.
PRETRAINED_THRESHOLDS = {"cosine": 0.940, "l2": -0.482}


class CommandError(Exception):
    """Bad input: printed as `facefed-agent <command>: <message>`, exit code 2."""


def _settings(args: argparse.Namespace):
    from edge_agent.config import UnlockSettings, load_unlock_settings

    if args.config is None:
        return UnlockSettings(), None
    if not Path(args.config).is_file() and args.command == "calibrate":
        return UnlockSettings(), None  # calibrate creates the file
    return load_unlock_settings(args.config)


def _store(args: argparse.Namespace, configured: Path | None) -> TemplateStore:
    root = args.store or configured
    if root is None:
        raise CommandError("no template store: pass --store DIR, or --config with unlock.store or state_dir")
    return TemplateStore(root)


def _analyzer(args: argparse.Namespace, model, score: str | None = None) -> FaceAnalyzer:
    """The unlock path for --model with --detector and --landmarks, else the device profile's in --config; score:
    how embeddings compare (None: the model's declared score for unlock)."""
    import torch

    from model_zoo.pipeline import FacePipeline

    if args.threads < 1:
        raise CommandError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)  # the tiny detector and the 68-point net run in torch
    detector, landmarks = DEFAULT_DETECTOR, DEFAULT_LANDMARKS
    if args.config is not None and Path(args.config).is_file():
        from edge_agent.config import load_device_profile

        profile = load_device_profile(args.config)
        detector, landmarks = profile.detector, profile.landmarks
    detector, landmarks = args.detector or detector, args.landmarks or landmarks
    embedder, ref = load_model(model, args.threads, score=score)
    return FaceAnalyzer(embedder, ref, FacePipeline(detector=detector, landmarks=landmarks, threads=args.threads))


def run_command(args: argparse.Namespace) -> int:
    handlers = {"enroll": enroll_command, "unlock": unlock_command, "calibrate": calibrate_command}
    try:
        return handlers[args.command](args)
    except (CommandError, ConfigError, StoreError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"facefed-agent {args.command}: {exc}", file=sys.stderr)
        return 2


def enroll_command(args: argparse.Namespace) -> int:
    from .enroll import enroll
    from .sources import open_source

    settings, configured_store = _settings(args)
    store = _store(args, configured_store)
    analyzer = _analyzer(args, args.model or settings.model or PRETRAINED, _score_option(args))
    with open_source(args.source, args.fps) as source:
        result = enroll(args.name, source, analyzer, store, args.templates, args.max_frames, aligned=args.aligned)
    for label, reason in result.rejections:
        print(f"rejected {label}: {reason}")
    rejected = ", ".join(f"{k} {v}" for k, v in result.rejected.most_common()) or "none"
    print(f"enrolled {args.name}: {len(result.enrolment.chips)} template(s) from {result.frames} frame(s) "
          f"(rejected: {rejected}) with {analyzer.model.label} ({analyzer.model.score} score), stored in {store.root}")
    return 0


def unlock_command(args: argparse.Namespace) -> int:
    from .session import UnlockSession, run_unlock
    from .sources import open_source

    settings, configured_store = _settings(args)
    store = _store(args, configured_store)
    enrolments = store.load_all()
    model = args.model or _enrolment_model(enrolments)
    analyzer = _analyzer(args, model, _enrolment_score(enrolments))
    rules = DecisionRules(
        threshold=_threshold(args, settings, analyzer), score=analyzer.model.score, k=args.k or settings.k, n=args.n or settings.n,
        timeout_s=settings.timeout_s if args.timeout is None else args.timeout,
        lockout_failures=settings.lockout_failures, lockout_s=settings.lockout_s,
        relock_after_s=settings.relock_after_s if args.relock_after is None else args.relock_after)
    liveness = args.liveness or settings.liveness
    frames = FrameStore(settings.frames_dir(store.root), settings.keep_frames) if settings.keep_frames else None
    session = UnlockSession(analyzer, enrolments, rules, make_challenge(liveness, analyzer.pipeline.landmarks_name),
                            aligned=args.aligned, frames=frames)
    with open_source(args.source, args.fps) as source:
        log.info("unlock on %s with %s: threshold %.3f (%s), %d of %d frames, liveness %s, relock after %.1f s",
                 source.info.description, analyzer.model.label, rules.threshold, rules.score, rules.k, rules.n, liveness,
                 rules.relock_after_s)
        summary = run_unlock(session, source, args.save, args.json_log, show_window=not args.no_window,
                             on_frame=_ReasonPrinter())
    unlocked = sum(1 for _, _, event in summary.events if event == "unlocked")
    print(f"{summary.frames} frames: unlocked {unlocked} time(s), {summary.states['unlocked']} frames unlocked"
          + (f"; annotated video {args.save}" if args.save else "") + (f"; log {args.json_log}" if args.json_log else ""))
    median = summary.median_ms()
    if median:
        print(f"median frame {median['total']:.1f} ms: " + ", ".join(f"{stage} {median[stage]:.1f}" for stage in
                                                                     ("detect", "landmarks", "align", "embed", "decide"))
              + f" ({analyzer.pipeline.detector_name} detector, {analyzer.pipeline.landmarks_name} landmarks)")
    return 0


class _ReasonPrinter:
    """One console line whenever the reason changes: frame, time, reason, that frame's latency split."""

    def __init__(self) -> None:
        self.last: str | None = None

    def __call__(self, record) -> None:
        kind = record.reason.split(":")[0].split(" (")[0]  # the reason without its changing score
        if kind == self.last:
            return
        self.last = kind
        split = " ".join(f"{stage} {ms:.0f}" for stage, ms in record.stage_ms.items())
        print(f"frame {record.frame} t={record.t:.1f}s: {record.reason} | {record.ms:.0f} ms ({split})")


def _enrolment_model(enrolments) -> str:
    """The model the templates were made with (after a federated round: the re-embedded global model)."""
    paths = {e.model.path for e in enrolments}
    if len(paths) > 1:
        raise CommandError(f"the enrolments were made by different models ({', '.join(map(str, paths))}): "
                           "pass --model and enrol again where needed")
    path = paths.pop()
    if path is not None and not Path(path).is_file():
        raise CommandError(f"the model the templates were made with is gone ({path}): pass --model and enrol again")
    return path or PRETRAINED


def _score_option(args: argparse.Namespace) -> str | None:
    return None if args.score == "auto" else args.score


def _enrolment_score(enrolments) -> str:
    """The score the templates compare by: unlock embeds the frames the same way."""
    scores = {e.model.score for e in enrolments}
    if len(scores) > 1:
        raise CommandError(f"the enrolments compare by different scores ({', '.join(sorted(scores))}): enrol again "
                           "with one --score")
    return scores.pop()


def _threshold(args: argparse.Namespace, settings, analyzer: FaceAnalyzer) -> float:
    if args.threshold is not None:
        return args.threshold
    if settings.threshold is not None:
        if settings.threshold_score != analyzer.model.score:
            raise CommandError(f"unlock.threshold is a {settings.threshold_score} score, but {analyzer.model.label} "
                               f"compares by {analyzer.model.score}: run `facefed-agent calibrate --score {analyzer.model.score}` again")
        if settings.calibrated_model_sha256 not in (None, analyzer.model.sha256):
            log.warning("unlock.threshold was calibrated on another model: run `facefed-agent calibrate` again")
        return settings.threshold
    if analyzer.model.path is None:
        threshold = PRETRAINED_THRESHOLDS[analyzer.model.score]
        log.info("no calibrated threshold in the config: using %.3f (%s), the pretrained descriptor's at FAR 1e-3",
                 threshold, analyzer.model.score)
        return threshold
    raise CommandError(f"no threshold for {analyzer.model.label}: run `facefed-agent calibrate --faces DIR --config "
                       "agent.yaml --model ...` or pass --threshold")


def calibrate_command(args: argparse.Namespace) -> int:
    from edge_agent.config import update_unlock_settings

    from .calibrate import calibrate_embeddings, embed_labelled, labelled_images, plot_roc_det
    from .calibration import ENROL_IMAGES, ENROLMENT_DRAWS

    settings, _ = _settings(args)
    samples = labelled_images(args.faces)
    analyzer = _analyzer(args, args.model or settings.model or PRETRAINED, _score_option(args))
    data = embed_labelled(analyzer, samples)
    too_few = [name for label, name in enumerate(data.identities) if (data.labels == label).sum() <= ENROL_IMAGES]
    if too_few:
        log.warning("%d of %d people have %d images or fewer, so only serve as impostors: %s", len(too_few),
                    len(data.identities), ENROL_IMAGES, ", ".join(too_few))
    calibration, scores, genuine = calibrate_embeddings(data, args.target_far, analyzer.model.score)
    trials = f"template trials (mean of {ENROL_IMAGES} images, {ENROLMENT_DRAWS} random enrolments per person)"
    plot = args.plot or Path(args.config).with_name("unlock-calibration.png")
    plot_roc_det(scores, genuine, calibration, plot,
                 f"{analyzer.model.label} on {args.faces.name}, template of {ENROL_IMAGES} vs image")
    update_unlock_settings(args.config, {"threshold": round(calibration.threshold, 6),
                                         "threshold_score": calibration.score,
                                         "target_far": calibration.target_far,
                                         "calibrated_model_sha256": analyzer.model.sha256})
    if args.json:
        args.json.write_text(json.dumps({**calibration.to_dict(), "model": analyzer.model.label,
                                         "images": len(samples), "identities": len(data.identities),
                                         "trials": "template", "enrol_images": ENROL_IMAGES,
                                         "enrolment_draws": ENROLMENT_DRAWS}, indent=2))
    print(f"threshold {calibration.threshold:.4f} ({calibration.score} score) for FAR {calibration.target_far:g} on {trials}: "
          f"FAR {calibration.far:.2e} ({calibration.false_accepts}/{calibration.impostor_trials} impostor trials), "
          f"FRR {calibration.frr:.3f} ({calibration.false_rejects}/{calibration.genuine_trials} genuine trials), "
          f"EER {calibration.eer:.3f}; written to {args.config}, curves in {plot}")
    return 0
