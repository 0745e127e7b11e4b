"""`emotion2vec-serve heads train DATA --name NAME`: a custom head fitted on labelled clips
(docs/heads.md): embeddings as the service computes them (the batch job's stages, cached),
cross-validated (UA, WA, macro F1, confusion, ECE before and after the fitted temperature,
a shuffled-label control), refitted on every clip and written as the next revision in
heads_dir, or as a file for PUT /v1/heads/{name}.

`emotion2vec-serve heads evaluate HEAD|builtin DATA`: a head (or the checkpoint's own, with a
label map) measured on labelled clips, through the running service or in this process.

Exit status 2 when it refuses (fewer than 2 labels, a label with fewer clips than folds,
unreadable clips without --skip-bad, a head for another checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from serve_app.tools.batch.job import DEFAULT_CONFIG

KINDS = ("linear", "mlp", "prototype")
API_KEY_ENV = "EMOTION2VEC_API_KEY"
SHOWN_FAILURES = 5


def add_parser(commands) -> None:
    heads = commands.add_parser("heads", help="train and evaluate custom heads",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = heads.add_subparsers(dest="heads_command", required=True)
    train = verbs.add_parser("train", help="fit a head on labelled clips")
    train.add_argument("data", metavar="DATA", help="label folders, a manifest (.csv, .jsonl, "
                       ".parquet) or `batch --embeddings` output with a label column")
    train.add_argument("--name", required=True, help="the head's name")
    train.add_argument("--kind", choices=KINDS, default="linear", help="the head's model")
    train.add_argument("--group-by", default=None, metavar="COLUMN",
                       help="no group in two folds (default: a manifest's group column)")
    train.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    train.add_argument("--seed", type=int, default=0, help="folds, the control, the MLP")
    train.add_argument("--skip-bad", action="store_true",
                       help="train on the readable clips when some are not")
    where = train.add_mutually_exclusive_group()
    where.add_argument("--heads-dir", default=None,
                       help="store the next revision here (default: the config's heads_dir)")
    where.add_argument("--out", default=None, metavar="FILE",
                       help="write the head file here instead (for PUT /v1/heads/{name})")
    _common(train)
    train.add_argument("--cache-dir", default=None,
                       help="the embedding cache (default: $EMOTION2VEC_EMBEDDINGS_CACHE, "
                            "else ~/.cache/emotion2vec-serve/embeddings)")
    train.add_argument("--address", default=None,
                       help="the Ray cluster for the embeddings (as batch --address)")
    train.add_argument("--num-cpus", type=float, default=None,
                       help="CPUs of the engine actor (default: batch's --num-cpus)")
    evaluate = verbs.add_parser("evaluate", help="measure a head on labelled clips")
    evaluate.add_argument("head", metavar="HEAD", help="NAME[@REV], a head file (--local), "
                          "or builtin: the checkpoint's own nine-class head")
    evaluate.add_argument("data", metavar="DATA", help="label folders or a manifest")
    evaluate.add_argument("--label-map", default=None,
                          help="DATA_LABEL=MODEL_LABEL,... (default: the same names)")
    evaluate.add_argument("--url", default="http://127.0.0.1:8000", help="the service")
    evaluate.add_argument("--local", action="store_true",
                          help="score in this process (the config's engine), not the service")
    _common(evaluate)
    evaluate.add_argument("--heads-dir", default=None,
                          help="--local: where HEAD is (default: the config's heads_dir)")
    evaluate.add_argument("--report", default=None, metavar="FILE", help="write a JSON report")
    evaluate.add_argument("--plot", default=None, metavar="FILE",
                          help="write the confusion matrix as a PNG")
    evaluate.add_argument("--tries", type=int, default=5, help="attempts per clip (service)")
    evaluate.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    evaluate.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                          help=f"the service's API key (default: ${API_KEY_ENV})")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="the Serve config whose model to use (default: configs/cpu.yaml)")
    parser.add_argument("--model-version", default=None,
                        help="a variant or an alias; default: the config's default_version")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from serve_app.errors import ModelLoadError
    from serve_app.heads.data import DataError
    from serve_app.heads.embeddings import ExtractionError
    from serve_app.heads.headfile import HeadBackboneMismatch, InvalidHead, UnknownHead
    from serve_app.heads.scoring import ScoringError
    from serve_app.tools.batch.plan import PlanError

    try:
        return (train if args.heads_command == "train" else evaluate)(args, parser)
    except (DataError, ExtractionError, PlanError, ScoringError, InvalidHead, UnknownHead,
            HeadBackboneMismatch, ModelLoadError) as exc:
        return _fail(str(exc))


def heads_dir(args: argparse.Namespace) -> str:
    """--heads-dir, else the config's Router heads_dir, else RouterSettings' default."""
    from serve_app.config import ROUTER_NAME, RouterSettings
    from serve_app.tools.cluster import load_app

    if args.heads_dir:
        return args.heads_dir
    app = load_app(args.config)
    for deployment in app.get("deployments") or []:
        if deployment.get("name") == ROUTER_NAME and "heads_dir" in (
                deployment.get("user_config") or {}):
            return deployment["user_config"]["heads_dir"]
    return RouterSettings.model_fields["heads_dir"].default


def _max_head_bytes() -> int:
    from serve_app.config import HeadSettings

    return HeadSettings.model_fields["max_head_bytes"].default


def _too_few(counts: dict[str, int], folds: int) -> str | None:
    if len(counts) < 2:
        return f"a head needs at least 2 labels; the data has {list(counts) or 'none'}"
    small = {label: n for label, n in counts.items() if n < folds}
    if small:
        return (f"labels with fewer clips than --folds {folds}: {small}; add clips or lower "
                "--folds")
    return None


def _refuse_bad(bad: list[tuple], total: int) -> str:
    from collections import Counter

    reasons = Counter(error.split(":", 1)[0] for _, error in bad)
    shown = "\n".join(f"  {clip.where}: {error}" for clip, error in bad[:SHOWN_FAILURES])
    more = f"\n  ... and {len(bad) - SHOWN_FAILURES} more" if len(bad) > SHOWN_FAILURES else ""
    return (f"{len(bad)} of {total} clips could not be used ("
            + ", ".join(f"{n} {code}" for code, n in reasons.most_common())
            + f"):\n{shown}{more}\npass --skip-bad to train on the other {total - len(bad)}")


def _libraries() -> dict[str, str | None]:
    from importlib import metadata

    found = {}
    for name in ("scikit-learn", "numpy", "scipy", "safetensors", "torch", "funasr"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _manifest_sha256(clips, keys) -> str:
    """What the head was trained on, whatever DATA's form: the clips' contents, segments,
    labels and groups."""
    import hashlib

    lines = sorted(json.dumps([key, clip.start_s, clip.end_s, clip.label, clip.group])
                   for clip, key in zip(clips, keys))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import numpy as np

    from serve_app.heads import data as datasets
    from serve_app.heads import embeddings, fit, metrics
    from serve_app.heads.headfile import NAME, encode
    from serve_app.heads.registry import HeadRegistry
    from serve_app.tools.batch.plan import plan_job

    if not NAME.fullmatch(args.name):
        parser.error(f"--name {args.name!r}: lower-case letters, digits, '.', '_', '-'")
    if args.folds < 2 or (args.num_cpus is not None and args.num_cpus <= 0):
        parser.error("--folds must be at least 2, --num-cpus positive")
    labelled = datasets.read(args.data, args.group_by)
    clips = labelled.clips
    if problem := _too_few(labelled.counts(), args.folds):
        return _fail(problem)
    if labelled.kind == "embeddings":  # batch output: nothing decoded again
        found = embeddings.Extraction([clip.embedding for clip in clips],
                                      [clip.error for clip in clips],
                                      backbone=labelled.backbone, hits=len(clips))
        keys = [clip.path for clip in clips]
    else:
        plan = plan_job(args.config, args.model_version)
        found = embeddings.extract(clips, plan, embeddings.cache_root(args.cache_dir),
                                   args.address, args.num_cpus)
        keys = found.keys
    bad = [(clip, error) for clip, error in zip(clips, found.errors) if error]
    if bad and not args.skip_bad:
        return _fail(_refuse_bad(bad, len(clips)))
    kept = [i for i, error in enumerate(found.errors) if not error]
    clips = [clips[i] for i in kept]
    counts = {label: sum(clip.label == label for clip in clips) for label in labelled.labels}
    if problem := _too_few({k: n for k, n in counts.items() if n}, args.folds):
        return _fail(f"after leaving out {len(bad)} clips: {problem}")
    labels = sorted({clip.label for clip in clips})
    X = np.stack([found.embeddings[i] for i in kept]).astype(np.float32)
    y = np.array([labels.index(clip.label) for clip in clips])
    groups = None
    if labelled.group_by:
        groups = np.array([clip.group for clip in clips])
        if len(set(groups)) < args.folds:
            return _fail(f"--group-by {labelled.group_by}: {len(set(groups))} groups for "
                         f"{args.folds} folds; each fold needs a group of its own")
        alone = [label for i, label in enumerate(labels) if len(set(groups[y == i])) < 2]
        if alone:
            return _fail(f"labels whose clips are all in one {labelled.group_by}: {alone}; "
                         "holding that group out would leave the label untrained")

    fit_started = time.monotonic()
    folds = fit.splits(y, groups, args.folds, args.seed)
    scored, temperature = fit.cross_validate(args.kind, X, y, folds, args.seed, labels)
    scored["control"] = fit.control(args.kind, X, y, groups, args.folds, args.seed, labels)
    estimator = fit.fit_estimator(args.kind, X, y, args.seed)
    tensors = fit.tensors_of(args.kind, estimator)
    difference = fit.check_conversion(args.kind, estimator, tensors, X)
    fit_s = time.monotonic() - fit_started

    backbone = {**found.backbone, "embedding_dim": int(X.shape[1])}
    metadata = {
        "name": args.name, "kind": args.kind, "labels": labels,
        "embedding_dim": int(X.shape[1]), "temperature": temperature, "backbone": backbone,
        "metrics": scored,
        "training": {
            "clips_per_label": dict(zip(labels, np.bincount(y, minlength=len(labels)).tolist())),
            "manifest_sha256": _manifest_sha256(clips, [keys[i] for i in kept]),
            "data": labelled.kind, "folds": args.folds, "group_by": labelled.group_by,
            "seed": args.seed, "kind": args.kind, "libraries": _libraries(),
            "embedding_s": round(found.seconds, 3), "fit_s": round(fit_s, 3),
            "embedding_cache": {"hits": found.hits, "extracted": found.extracted},
            "conversion_max_difference": difference,
            "skipped": [{"path": clip.path, "start_s": clip.start_s, "end_s": clip.end_s,
                         "error": error} for clip, error in bad]},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    data = encode(metadata, tensors)
    if args.out:
        Path(args.out).write_bytes(data)
        where = f"written to {args.out} (register it: PUT /v1/heads/{args.name})"
    else:
        location = heads_dir(args)
        head = HeadRegistry(location, _max_head_bytes()).put(data)
        where = f"stored as {head.name}@{head.revision} in {location}"
    print(_train_report(metadata, found, bad, where, metrics))
    return 0


def _train_report(meta: dict, found, bad: list, where: str, metrics) -> str:
    scored, training = meta["metrics"], meta["training"]
    overall, control = scored["overall"], scored["control"]
    grouping = f", grouped by {training['group_by']}" if training["group_by"] else ""
    lines = [f"head {meta['name']} ({meta['kind']}, {len(meta['labels'])} labels, "
             f"{meta['embedding_dim']}-d) {where}",
             f"backbone: {meta['backbone']['arch']} {meta['backbone']['sha256'][:12]} "
             f"({meta['backbone'].get('variant')})",
             f"embeddings: {len(found.embeddings)} clips, {found.hits} from the cache, "
             f"{found.extracted} extracted, in {training['embedding_s']:.1f} s"
             + (f"; {len(bad)} left out (--skip-bad)" if bad else ""),
             f"cross-validation: {training['folds']} folds{grouping}; fit in "
             f"{training['fit_s']:.1f} s"]
    lines += [metrics.line(f"  fold {i + 1}", fold) for i, fold in enumerate(scored["folds"])]
    lines.append(metrics.line("  overall", overall))
    lines.append(f"  temperature {meta['temperature']:.3f} (ECE before -> after it)")
    lines.append(f"  shuffled-label control: UA {control['ua']:.3f} (chance "
                 f"{control['chance_ua']:.3f})")
    lines.append("confusion matrix of the held-out clips:")
    lines.append(metrics.table(overall))
    return "\n".join(lines)


def evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import numpy as np

    from serve_app.heads import metrics, scoring
    from serve_app.heads.data import read
    from serve_app.heads.headfile import decode, parse_reference
    from serve_app.heads.registry import HeadRegistry

    labelled = read(args.data)
    builtin = args.head == scoring.BUILTIN
    label_map = scoring.parse_label_map(args.label_map)
    started = time.monotonic()
    if args.local:
        from serve_app.tools.batch.plan import plan_job

        head = None
        if not builtin:
            if Path(args.head).is_file():
                head = decode(Path(args.head).read_bytes(), _max_head_bytes())
            else:
                head = HeadRegistry(heads_dir(args), _max_head_bytes()).read(
                    *parse_reference(args.head))
        scorer = scoring.LocalScorer(plan_job(args.config, args.model_version), head)
        mapping, scored = scoring.targets(labelled.labels, scorer.labels, label_map)
        outcomes = scorer.score(labelled.clips, scored)
        what = "the checkpoint's head" if builtin else f"{head.name}@{head.revision}"
    else:
        reference = None if builtin else args.head
        labels = scoring.remote_labels(args.url, reference, args.model_version,
                                        args.api_key, args.timeout)
        mapping, scored = scoring.targets(labelled.labels, labels, label_map)
        outcomes = scoring.score_remote(labelled.clips, scored, args.url, reference,
                                        args.model_version, args.api_key, args.tries,
                                        args.timeout)
        what = f"{args.head} at {args.url}"
    failed = [(clip, outcome) for clip, outcome in zip(labelled.clips, outcomes)
              if isinstance(outcome, str)]
    good = [(clip, outcome) for clip, outcome in zip(labelled.clips, outcomes)
            if not isinstance(outcome, str)]
    if not good:
        return _fail(_refuse_bad(failed, len(outcomes)))
    y = np.array([scored.index(mapping[clip.label]) for clip, _ in good])
    probabilities = np.array([[outcome[label] for label in scored] for _, outcome in good])
    found = metrics.scores(y, probabilities.argmax(axis=1), scored)
    found["ece"] = metrics.ece(probabilities, y)
    report = {"head": args.head, "scored_by": what, "data": str(args.data),
              "label_map": mapping, "labels": scored, "metrics": found,
              "failed": [{"path": clip.where, "error": error} for clip, error in failed],
              "seconds": round(time.monotonic() - started, 3)}
    print(f"{what} on {len(good)} clips ({len(failed)} failed): UA {found['ua']:.3f}  WA "
          f"{found['wa']:.3f}  macro F1 {found['macro_f1']:.3f}  ECE {found['ece']:.3f}")
    print(metrics.table(found))
    for clip, error in failed[:SHOWN_FAILURES]:
        print(f"failed: {clip.where}: {error}", file=sys.stderr)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        try:
            metrics.plot_confusion(found, args.plot, f"{args.head}: UA {found['ua']:.3f}")
        except ImportError:
            return _fail("--plot needs matplotlib (pip install matplotlib, or the notebook "
                         "extra); the report above is complete")
    return 1 if failed else 0
