"""`emotion2vec-serve batch INPUT... --out DIR`: score whole archives with a Ray Data job.

The files (directories are searched for audio, glob patterns expanded) are read and decoded in
CPU tasks as the service decodes uploads, then scored in a pool of actors that each hold the
variant's engine, loaded once; the rows are written to DIR as Parquet parts, each complete or
absent. The model and the limits come from a Serve config (the variant's user_config and the
Router's limits), so that a row equals what POST /v1/predict answers for the same file.

Exit status: 0 when every file was scored, 1 when some failed (their rows say why), 2 when the
job could not run (flags, config, output directory, cluster resources, engine start).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when a job runs: `emotion2vec-serve predict` stays light
    from serve_app.tools.batch.plan import JobPlan

MAX_BLOCKS = 2000
DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "cpu.yaml"


def _pool_size(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        size = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give N or MIN-MAX") from None
    if not 1 <= size[0] <= size[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= MIN <= MAX")
    return size


def add_parser(commands) -> None:
    batch = commands.add_parser("batch", help="score audio files in bulk with a Ray Data job",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    batch.add_argument("inputs", nargs="+", metavar="INPUT",
                       help="files, directories (searched for audio), glob patterns")
    batch.add_argument("--out", required=True, metavar="DIR", help="the Parquet parts' folder")
    batch.add_argument("--resume", action="store_true",
                       help="add to DIR: skip the files its complete parts already hold")
    batch.add_argument("--config", default=str(DEFAULT_CONFIG),
                       help="the Serve config whose model and limits to use "
                            "(default: configs/cpu.yaml)")
    batch.add_argument("--model-version", default=None,
                       help="a variant or an alias; default: the config's default_version")
    batch.add_argument("--head", default=None,
                       help="a custom head from the config's heads_dir: NAME, NAME@REV or a "
                            "head alias (default: the model's own head)")
    batch.add_argument("--embeddings", action="store_true", help="add the embedding column")
    batch.add_argument("--by-segment", action="store_true",
                       help="one row per speech segment, as POST /v1/segments cuts them: the "
                            "turns of NAME.rttm beside NAME.wav, else the VAD's")
    batch.add_argument("--batch-size", type=int, default=None,
                       help="clips per padded pass (default: the variant's max_batch_size)")
    for flag, kind in (("--max-duration-s", float), ("--max-upload-bytes", int),
                       ("--max-decoded-bytes", int)):
        batch.add_argument(flag, type=kind, default=None,
                           help=f"raise the Router's {flag[2:].replace('-', '_')}")
    batch.add_argument("--address", default=None,
                       help="the Ray cluster (auto, or the head's host:port); default: the "
                            "local one on 127.0.0.1, or a new local one if there is none")
    batch.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per engine actor")
    batch.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per engine actor")
    batch.add_argument("--concurrency", type=_pool_size, default=(1, 1), metavar="N|MIN-MAX",
                       help="engine actors (a range autoscales the pool)")
    batch.add_argument("--decode-cpus", type=float, default=0.5, help="CPUs per decode task")
    batch.add_argument("--files-per-task", type=int, default=16, help="files per decode task")
    batch.add_argument("--part-rows", type=int, default=10_000, help="rows per Parquet part")
    batch.add_argument("--part-s", type=float, default=60.0,
                       help="write a part at least this often (seconds)")
    batch.add_argument("--placement-timeout-s", type=float, default=30.0,
                       help="how long to wait for room for the engines before giving up")
    batch.add_argument("--start-timeout-s", type=float, default=600.0,
                       help="how long the engines may take to start (model load included)")
    batch.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import pyarrow as pa

    from serve_app.tools.batch.parts import OutputDirError, prepare
    from serve_app.tools.batch.plan import PlanError, plan_job
    from serve_app.tools.batch.resources import NoRoom, check_room, connect
    from serve_app.tools.client import expand

    positive = ("num_cpus", "decode_cpus", "part_s", "placement_timeout_s", "start_timeout_s")
    if any(getattr(args, name) <= 0 for name in positive) or args.num_gpus < 0 \
            or args.files_per_task < 1 or args.part_rows < 1:
        parser.error("--num-cpus, --decode-cpus, --part-s and the timeouts must be positive, "
                     "--num-gpus at least 0, --files-per-task and --part-rows at least 1")
    try:
        plan = plan_job(args.config, args.model_version, batch_size=args.batch_size,
                        max_duration_s=args.max_duration_s,
                        max_upload_bytes=args.max_upload_bytes,
                        max_decoded_bytes=args.max_decoded_bytes, head=args.head)
        listed = expand(args.inputs)
        out = Path(args.out).resolve()
        done = prepare(out, args.resume, plan.variant, args.embeddings, args.by_segment)
    except (PlanError, FileNotFoundError, OutputDirError) as exc:
        return _fail(str(exc))
    if not listed:
        return _fail("no audio files found")
    # Only the paths still to score stay in memory (as Arrow strings: compact).
    unique = dict.fromkeys(map(str, _resolved(listed)))
    todo = pa.array([path for path in unique if path not in done], pa.string())
    skipped, count = len(unique) - len(todo), len(unique)
    del listed, done, unique
    if not len(todo):
        print(f"nothing to do: all {count} files are already in {out}", file=sys.stderr)
        return 0
    try:
        print(connect(args.address), file=sys.stderr)
    except Exception as exc:  # ray.init raises many kinds
        return _fail(f"cannot join the Ray cluster: {exc}")
    try:
        check_room(_bundles(args), args.placement_timeout_s)
    except NoRoom as exc:
        return _fail(str(exc))
    return run(plan, todo, out, args, skipped)


def _resolved(paths: list[Path]):
    """Each path made absolute (the identity of a file), in place: no second list."""
    for index, path in enumerate(paths):
        yield path.resolve()
        paths[index] = None  # the Path objects go as they are used


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _bundles(args: argparse.Namespace) -> list[dict[str, float]]:
    """What the job needs to start: its smallest pool of engines and one decode task."""
    engine = {"CPU": args.num_cpus, **({"GPU": args.num_gpus} if args.num_gpus else {})}
    return [engine] * args.concurrency[0] + [{"CPU": args.decode_cpus}]


class Tally:
    """What the summary says: files by status and rows by error code, audio seconds scored,
    segment rows (--by-segment)."""

    def __init__(self):
        self.statuses: Counter = Counter()
        self.errors: Counter = Counter()
        self.audio_s = 0.0
        self.segments = 0
        self.nodes: set[str] = set()
        self.first_rows_s: float | None = None  # the engines' start, mostly
        self.first_rows = 0
        self.rows = 0

    def add(self, table) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        self.rows += table.num_rows
        self.errors.update(code for code in table.column("error_code").to_pylist() if code)
        self.nodes.update(table.column("node_id").unique().to_pylist())
        statuses = table.column("status").to_pylist()
        if "segment" in table.column_names:  # a table holds all of a file's rows
            self.segments += pc.count(table.column("segment")).as_py()
            failed = {path for path, status in zip(table.column("path").to_pylist(), statuses)
                      if status == "failed"}  # a file with a failed segment failed
            table = table.filter(pc.fill_null(pc.equal(table.column("segment"), 0), True))
            statuses = ["failed" if path in failed else "ok"
                        for path in table.column("path").to_pylist()]
        self.statuses.update(statuses)
        ok = table.filter(pa.array([status == "ok" for status in statuses]))
        self.audio_s += pc.sum(ok.column("duration_s")).as_py() or 0.0


def dataset(plan: JobPlan, todo, args: argparse.Namespace):
    import pyarrow as pa
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from serve_app.tools.batch.stages import EngineStage, decode_files

    context = DataContext.get_current()
    context.enable_progress_bars = not args.no_progress
    context.wait_for_min_actors_s = max(1, math.ceil(args.start_timeout_s))
    # One block per decode task, at most MAX_BLOCKS (Ray Data keeps a record per block): a
    # task then decodes its files --files-per-task at a time.
    per_block = max(args.files_per_task, math.ceil(len(todo) / MAX_BLOCKS))
    items = ray.data.from_arrow([pa.table({"path": todo.slice(start, per_block)})
                                 for start in range(0, len(todo), per_block)])
    # Ray Data fuses two maps with equal resources into one; a ray_remote_args_fn keeps the
    # decoding in tasks of its own, off the engines (which may hold GPUs).
    decoded = items.map_batches(decode_files, batch_size=args.files_per_task,
                                batch_format="pyarrow", num_cpus=args.decode_cpus,
                                fn_kwargs={"plan": plan, "by_segment": args.by_segment},
                                ray_remote_args_fn=dict)
    low, high = args.concurrency
    # Each engine call gathers several passes' worth of clips, so that like lengths pad
    # together (shortest first: serve_app/inference/passes.py).
    gather = max(args.files_per_task, 4 * plan.model.max_batch_size)
    return decoded.map_batches(
        EngineStage, batch_size=gather, batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=low, max_size=high),
        num_cpus=args.num_cpus, num_gpus=args.num_gpus or None,
        fn_constructor_kwargs={"plan": plan, "embeddings": args.embeddings,
                               "num_cpus": args.num_cpus, "by_segment": args.by_segment})


def run(plan: JobPlan, todo, out: Path, args: argparse.Namespace, skipped: int) -> int:
    from serve_app.tools.batch.parts import PartWriter

    writer = PartWriter(out, args.part_rows, args.part_s)
    tally = Tally()
    started = time.monotonic()
    print(f"scoring {len(todo)} files with {plan.variant} ({plan.model.source}) into {out}"
          + (f"; {skipped} already there" if skipped else ""), file=sys.stderr)
    try:
        for table in dataset(plan, todo, args).iter_batches(batch_format="pyarrow",
                                                             batch_size=None):
            if tally.first_rows_s is None:
                tally.first_rows_s = time.monotonic() - started
                tally.first_rows = table.num_rows
            writer.add(table)
            tally.add(table)
        writer.close()
    except KeyboardInterrupt:
        print(f"interrupted: {len(writer.written)} parts written to {out}; run again with "
              "--resume to score the rest", file=sys.stderr)
        return 130
    except Exception as exc:  # Ray Data re-raises what stopped the job: say it, keep the parts
        kind = "the engines did not start" if not writer.written and not tally.statuses \
            else "the job stopped"
        return _fail(f"{kind}: {_reason(exc)}\n{len(writer.written)} parts kept in {out}; "
                     "run again with --resume to score the rest")
    print(summary(tally, time.monotonic() - started, len(writer.written), out), file=sys.stderr)
    return 0 if tally.statuses.get("failed", 0) == 0 else 1


def _reason(exc: Exception) -> str:
    """The root cause: Ray's errors end with the remote traceback's last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def summary(tally: Tally, wall_s: float, parts: int, out: Path) -> str:
    files = sum(tally.statuses.values())
    segments = f" ({tally.segments} segments)" if tally.segments else ""
    lines = [f"{files} files in {wall_s:.1f} s: {tally.statuses.get('ok', 0)} ok, "
             f"{tally.statuses.get('failed', 0)} failed{segments}",
             f"audio: {tally.audio_s / 3600:.3f} h scored; {files / wall_s:.2f} files/s; "
             f"{tally.audio_s / wall_s:.1f} hours of audio per hour; engines on "
             f"{len(tally.nodes)} node(s)",
             f"first {tally.first_rows} rows after {tally.first_rows_s or 0:.1f} s (engines "
             f"starting); "
             f"{parts} parts written to {out}"]
    if tally.errors:
        lines.insert(1, "errors: " + ", ".join(f"{code} {n}"
                                               for code, n in tally.errors.most_common()))
    return "\n".join(lines)
