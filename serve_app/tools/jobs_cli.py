"""`emotion2vec-serve jobs submit|status|results|cancel|list`: jobs over HTTP (docs/jobs.md).

`submit INPUT...` names files, folders or URIs that the cluster reads (within the service's
jobs.allow_inputs), or with --archive uploads one local zip or tar (a local folder is packed
into a zip first). It prints the job's id; --wait then shows the progress until the job ends.
`results ID --out X.parquet|.csv|.jsonl` fetches the rows (partial while the job runs).
Exit status: 0 on success (`cancel`: the job is cancelled), 1 when the job failed or was
cancelled, 2 when the service refused.
The API key: --api-key, or the environment variable EMOTION2VEC_API_KEY.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx

from serve_app.tools.client import HEAD_HELP, error_text, retry_after_s

API_KEY_ENV = "EMOTION2VEC_API_KEY"
ENDED = ("succeeded", "failed", "cancelled")
POLL_S = 1.0


def add_parser(commands) -> None:
    jobs = commands.add_parser("jobs", help="score archives as jobs over HTTP", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = jobs.add_subparsers(dest="jobs_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default="http://127.0.0.1:8000", help="the service")
    common.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"the service's API key (default: ${API_KEY_ENV})")
    common.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for one answer (an upload included)")
    submit = verbs.add_parser("submit", parents=[common], help="submit a job")
    submit.add_argument("inputs", nargs="+", metavar="INPUT")
    submit.add_argument("--archive", action="store_true",
                        help="upload INPUT (a zip or tar; a folder is zipped) instead of naming "
                             "paths the cluster reads")
    submit.add_argument("--model-version", default=None, help="a variant or a plain alias")
    submit.add_argument("--head", default=None, help=HEAD_HELP)
    submit.add_argument("--labels", default=None, help="a label set, comma-separated")
    submit.add_argument("--by-segment", action="store_true", help="one row per speech segment")
    submit.add_argument("--embeddings", action="store_true", help="add the embedding column")
    submit.add_argument("--callback-url", default=None,
                        help="POSTed a signed summary when the job ends")
    submit.add_argument("--metadata", default=None, help="a JSON object, returned as given")
    submit.add_argument("--wait", action="store_true", help="show progress until the job ends")
    submit.add_argument("--no-progress", action="store_true",
                        help="with --wait: no progress bar, only the final status")
    for verb, text in (("status", "a job's state"), ("cancel", "cancel a job")):
        command = verbs.add_parser(verb, parents=[common], help=text)
        command.add_argument("job_id", metavar="ID")
    results = verbs.add_parser("results", parents=[common], help="fetch a job's rows")
    results.add_argument("job_id", metavar="ID")
    results.add_argument("--out", required=True, help="X.parquet, X.csv or X.jsonl")
    verbs.add_parser("list", parents=[common], help="this key's jobs")


class Refused(Exception):
    pass


def _client(args: argparse.Namespace) -> httpx.Client:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout)


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise Refused(error_text(response))
    return response


def _zipped(folder: Path) -> Path:
    handle, name = tempfile.mkstemp(prefix="e2v-", suffix=".zip")
    os.close(handle)
    with zipfile.ZipFile(name, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.write(path, path.relative_to(folder).as_posix())
    return Path(name)


def submit(client: httpx.Client, args: argparse.Namespace) -> dict:
    fields = {"model_version": args.model_version, "head": args.head, "labels": args.labels,
              "callback_url": args.callback_url,
              "metadata": json.loads(args.metadata) if args.metadata else None}
    fields = {name: value for name, value in fields.items() if value is not None}
    fields.update(by_segment=args.by_segment, embeddings=args.embeddings)
    if not args.archive:
        return _checked(client.post("/v1/jobs", json={"inputs": args.inputs, **fields})).json()
    if len(args.inputs) != 1:
        raise Refused("--archive uploads one zip, tar or folder")
    source = Path(args.inputs[0])
    path = _zipped(source) if source.is_dir() else source
    try:
        form = {name: json.dumps(value) if isinstance(value, dict) else str(value).lower()
                if isinstance(value, bool) else value for name, value in fields.items()}
        with open(path, "rb") as data:
            return _checked(client.post("/v1/jobs", data=form,
                                        files={"archive": (path.name, data)})).json()
    finally:
        if path != source:
            path.unlink(missing_ok=True)


def _bar(job: dict) -> str:
    files = job["files"]
    total, done = files.get("total") or 0, files.get("done") or 0
    filled = int(30 * done / total) if total else 0
    eta = f", {job['eta_s']:.0f} s left" if job.get("eta_s") else ""
    return (f"\r{job['state']:<9} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total or '?'} "
            f"files, {files.get('failed', 0)} failed, {job.get('audio_s', 0):.0f} s of "
            f"audio{eta}   ")


def wait(client: httpx.Client, job_id: str, out=sys.stderr, progress: bool = True) -> dict:
    while True:
        response = client.get(f"/v1/jobs/{job_id}")
        if response.status_code in (429, 503):  # busy or over a quota: ask again later
            time.sleep(max(POLL_S, retry_after_s(response.headers.get("retry-after"))))
            continue
        job = _checked(response).json()
        if progress:
            out.write(_bar(job))
            out.flush()
        if job["state"] in ENDED:
            if progress:
                out.write("\n")
            return job
        time.sleep(POLL_S)


def fetch_results(client: httpx.Client, job_id: str, out: Path) -> int:
    """Every row (all pages) into `out`; the number of rows."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    parts = _checked(client.get(f"/v1/jobs/{job_id}/results",
                                params={"format": "parquet"})).json()["parts"]
    tables = [pq.read_table(io.BytesIO(_checked(client.get(
        f"/v1/jobs/{job_id}/results", params={"format": "parquet", "part": part["name"]})
    ).content)) for part in parts]
    table = pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
    suffix = out.suffix.lower()
    if suffix == ".parquet":
        pq.write_table(table, out)
    elif suffix == ".csv":
        flat = table.drop_columns([name for name in table.column_names
                                   if pa.types.is_list(table.schema.field(name).type)])
        pacsv.write_csv(flat, out)
    else:
        with open(out, "w", encoding="utf-8") as handle:
            for row in table.to_pylist():
                handle.write(json.dumps(row) + "\n")
    return table.num_rows


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.jobs_command == "results" and Path(args.out).suffix.lower() not in (
            ".parquet", ".csv", ".jsonl"):
        parser.error("--out must end in .parquet, .csv or .jsonl")
    try:
        with _client(args) as client:
            if args.jobs_command == "submit":
                accepted = submit(client, args)
                print(accepted["job_id"])
                if not args.wait:
                    return 0
                job = wait(client, accepted["job_id"], progress=not args.no_progress)
            elif args.jobs_command == "status":
                job = _checked(client.get(f"/v1/jobs/{args.job_id}")).json()
            elif args.jobs_command == "cancel":
                job = _checked(client.delete(f"/v1/jobs/{args.job_id}")).json()
            elif args.jobs_command == "list":
                print(json.dumps(_checked(client.get("/v1/jobs")).json(), indent=2))
                return 0
            else:
                rows = fetch_results(client, args.job_id, Path(args.out))
                print(f"{rows} rows written to {args.out}", file=sys.stderr)
                return 0
    except (Refused, httpx.HTTPError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(job, indent=2))
    fine = ("succeeded", "queued", "running") + (("cancelled",) if args.jobs_command == "cancel"
                                                 else ())
    return 0 if job["state"] in fine else 1
