"""A bounded load test of `anomem serve` on this machine: good requests from concurrent clients,
then bad ones, then a check that the service still answers as it did.

    python benchmarks/serve_load.py MODEL [--images FOLDER] [--requests 2000] [--clients 8]
                                    [--bad 200] [--out benchmarks/serve-load/results.md]

MODEL (a run folder or an exported .onnx file) is served by its own process,
`python -m core.cli serve MODEL --port P` on 127.0.0.1 at a free port, so that the resident
memory read from /proc/<pid>/status is the server's alone. The images are the PNG files of
`--images` (sorted, the first POOL = 64 of them), else 64 images drawn (seeded) from the run's test
set and encoded as PNG; an .onnx model needs `--images`. Each good request uploads one of them,
in turn, in the multipart field "files"; the clients are threads, each on its own keep-alive
connection. A good request counts when it answers 200 with one finite score.

The bad requests are spread evenly over five kinds, each of which must get a 4xx answer with a
non-empty "detail": a truncated PNG, a text file (.txt), a file over MAX_UPLOAD_BYTES (a PNG
padded to about 21 MB), an empty file, and a malformed form (a multipart body without the field
"files", or a JSON body). Then the first image is scored again and must get the score it got
before the load. The server's RSS is read before the load, after the good requests, after
the bad ones, and after a second round (a quarter of the good requests, all the bad ones again):
memory that keeps climbing would be a leak. Writes a Markdown table with the command and date;
exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np

from core.data.imageio import MAX_UPLOAD_BYTES

ROOT = Path(__file__).resolve().parents[1]
POOL = 64  # distinct images the good requests cycle through
KINDS = ("truncated", "wrong type", "oversized", "empty", "malformed form")
EXPECTED = {"truncated": 422, "wrong type": 415, "oversized": 413, "empty": 422,
            "malformed form": 422}  # core/serve.py's answers (FastAPI's 422 for the form)
START_TIMEOUT = 180.0  # seconds the server may take to load the model and answer /health


class Request(NamedTuple):
    kind: str  # "good" or one of KINDS
    body: bytes
    content_type: str


class Outcome(NamedTuple):
    kind: str
    status: int  # 0: no HTTP answer (the connection failed)
    seconds: float
    ok: bool  # what this kind must get: 200 and a score, or a 4xx with a detail
    score: float | None  # a good request's score
    note: str  # why not ok


def multipart(files: list[tuple[str, bytes]], field: str = "files") -> tuple[bytes, str]:
    """A multipart/form-data body with each (file name, bytes) in `field`; (body, its type)."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
             f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
             + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def good_request(png: bytes, name: str = "image.png") -> Request:
    return Request("good", *multipart([(name, png)]))


def bad_requests(count: int, png: bytes) -> list[Request]:
    """`count` bad requests, the five kinds in turn (`png`: a valid image to spoil)."""
    oversized = png + b"\0" * (MAX_UPLOAD_BYTES + 2**20 - len(png))  # ~21 MB, a PNG's header
    requests = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        if kind == "truncated":
            body = multipart([("cut.png", png[:len(png) // 2])])
        elif kind == "wrong type":
            body = multipart([("notes.txt", b"not an image\n")])
        elif kind == "oversized":
            body = multipart([("huge.png", oversized)])
        elif kind == "empty":
            body = multipart([("empty.png", b"")])
        elif i // len(KINDS) % 2:  # malformed form, two ways in turn: a JSON body
            body = json.dumps({"files": "image.png"}).encode(), "application/json"
        else:  # ... and a multipart body whose field is not "files"
            body = multipart([("image.png", png)], field="file")
        requests.append(Request(kind, *body))
    return requests


def classify(kind: str, status: int, body: bytes) -> tuple[bool, float | None, str]:
    """(as it must be, the score of a good answer, why not): a good request must get 200 and
    one finite score; a bad one a 4xx with a non-empty "detail"."""
    try:
        answer = json.loads(body)
    except ValueError:
        return False, None, f"{status}, not JSON: {body[:80]!r}"
    if kind == "good":
        results = answer.get("results") if isinstance(answer, dict) else None
        if status != 200 or not isinstance(results, list) or len(results) != 1:
            return False, None, f"{status}: {str(answer)[:120]}"
        score = results[0].get("score")
        if not isinstance(score, int | float) or not math.isfinite(score):
            return False, None, f"{status}, score {score!r}"
        return True, float(score), ""
    detail = answer.get("detail") if isinstance(answer, dict) else None
    if not 400 <= status < 500:
        return False, None, f"{status}, expected a 4xx: {str(answer)[:120]}"
    if not detail:
        return False, None, f"{status} without a detail"
    return True, None, ""


class Client:
    """One keep-alive HTTP connection, opened again after a failure."""

    def __init__(self, port: int, timeout: float = 120.0) -> None:
        self.port, self.timeout = port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def post(self, request: Request) -> Outcome:
        start = time.perf_counter()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                       timeout=self.timeout)
            self.conn.request("POST", "/score", body=request.body,
                              headers={"Content-Type": request.content_type})
            response = self.conn.getresponse()
            status, body = response.status, response.read()
            if response.will_close:
                self.close()
        except (OSError, http.client.HTTPException) as err:
            self.close()
            return Outcome(request.kind, 0, time.perf_counter() - start, False, None,
                           f"{type(err).__name__}: {err}")
        seconds = time.perf_counter() - start
        ok, score, note = classify(request.kind, status, body)
        return Outcome(request.kind, status, seconds, ok, score, note)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def run_phase(port: int, requests: list[Request], clients: int) -> tuple[list[Outcome], float]:
    """Send `requests` from `clients` threads (client k sends every k-th); (outcomes in
    request order, wall seconds)."""
    def work(k: int) -> list[tuple[int, Outcome]]:
        client = Client(port)
        try:
            return [(i, client.post(requests[i])) for i in range(k, len(requests), clients)]
        finally:
            client.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = [pair for part in pool.map(work, range(clients)) for pair in part]
    wall = time.perf_counter() - start
    return [o for _, o in sorted(done, key=lambda pair: pair[0])], wall


class Server:
    """`anomem serve MODEL` in a process of its own, on 127.0.0.1 at a free port."""

    def __init__(self, model: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "core.cli", "serve", str(model), "--port", str(self.port)],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = START_TIMEOUT) -> None:
        """Until /health answers; the server's output in the error when it does not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.log.seek(0)
        output = self.log.read().decode(errors="replace")[-2000:]
        raise RuntimeError(f"the server did not answer /health (exit status "
                           f"{self.proc.poll()}):\n{output}")

    def memory_mb(self) -> tuple[float, float]:
        """(resident, peak resident) MB of the server process, from /proc/<pid>/status."""
        fields = dict(line.split(":", 1) for line in
                      Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
                      if ":" in line)
        return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def load_pngs(model: Path, folder: Path | None, count: int = POOL, seed: int = 0) -> list[bytes]:
    """The good requests' images as PNG bytes: `folder`'s PNG files, else a seeded sample of
    the run's test images."""
    if folder is not None:
        paths = sorted(folder.glob("*.png"))[:count]
        if not paths:
            raise SystemExit(f"--images {folder}: no .png files there")
        return [p.read_bytes() for p in paths]
    if not model.is_dir():
        raise SystemExit(f"{model}: an exported model does not say where its test set is; "
                         "pass --images FOLDER")
    from PIL import Image

    from core.data import load_split
    from core.runs import read_config

    test = load_split(read_config(model).data).test.images
    pick = np.random.default_rng(seed).choice(len(test), min(count, len(test)), replace=False)
    pngs = []
    for image in test[np.sort(pick)]:
        out = io.BytesIO()
        array = image.permute(1, 2, 0).numpy()
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(out, "PNG")
        pngs.append(out.getvalue())
    return pngs


def same_score(before: Outcome, after: Outcome) -> bool:
    """Whether one image scored alone before and after the load got one score (float noise
    aside: both are batches of one, so it should be the very same number)."""
    return before.score is not None and after.score is not None and \
        abs(after.score - before.score) <= 1e-6 * max(1.0, abs(before.score))


def report(args: argparse.Namespace, good: list[Outcome], good_s: float, bad: list[Outcome],
           before: Outcome, after: Outcome, memory: dict[str, tuple[float, float]],
           again: list[Outcome]) -> str:
    """The results as Markdown: what was run, then one table."""
    ms = np.array([o.seconds for o in good if o.ok]) * 1000
    errors = sum(not o.ok for o in good)
    by_kind = []
    for kind in KINDS:
        mine = [o for o in bad if o.kind == kind]
        statuses = ", ".join(f"{n}x {s}" for s, n in sorted(Counter(o.status for o in mine)
                                                             .items()))
        by_kind.append([f"bad: {kind} (expected {EXPECTED[kind]})",
                        f"{sum(o.ok for o in mine)}/{len(mine)} answered 4xx with a detail "
                        f"({statuses or 'none sent'})"])
    rows = [
        ["good requests", f"{len(good)} from {args.clients} clients, {errors} errors"],
        ["good requests, second round", f"{len(again)}, {sum(not o.ok for o in again)} errors"],
        ["latency, median", f"{np.median(ms):.1f} ms" if len(ms) else "–"],
        ["latency, 99th percentile", f"{np.percentile(ms, 99):.1f} ms" if len(ms) else "–"],
        ["throughput", f"{len(good) / good_s:.1f} requests/s ({good_s:.1f} s in all)"],
        *by_kind,
        ["a good request after the load",
         f"{'same' if same_score(before, after) else 'DIFFERENT'} score ({before.score!r} "
         f"before, {after.score!r} after{'; ' + after.note if after.note else ''})"],
        *([f"server RSS, {when}", f"{rss:.0f} MB (peak so far {peak:.0f} MB)"]
          for when, (rss, peak) in memory.items()),
    ]
    failures = [o.note for o in [*good, *bad] if not o.ok][:5]
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/serve_load.py",
                                                *sys.argv[1:]])
    images = args.images or "the run's test set"
    return (f"# `anomem serve` under load\n\n`{command}`, "
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, on {os.cpu_count()} CPUs; "
            f"model: `{args.model}`; images: {images} "
            f"(one per request).\n\n| | value |\n|---|---|\n"
            + "".join(f"| {a} | {b} |\n" for a, b in rows)
            + ("\nFirst failures:\n\n" + "".join(f"- {n}\n" for n in failures)
               if failures else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="a run folder or an exported .onnx file")
    ap.add_argument("--images", type=Path, help="a folder of .png files (default: the run's "
                                                "test images)")
    ap.add_argument("--requests", type=int, default=2000, help="good requests (default 2000)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--bad", type=int, default=200, help="bad requests (default 200)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "serve-load" / "results.md")
    args = ap.parse_args()
    if min(args.requests, args.clients) < 1 or args.bad < 0:
        ap.error("--requests and --clients must be at least 1, --bad at least 0")

    if not args.model.exists():
        ap.error(f"{args.model}: no such run folder or .onnx file")
    pngs = load_pngs(args.model, args.images)
    server = Server(args.model)
    try:
        server.wait()
        client = Client(server.port)
        before = client.post(good_request(pngs[0]))
        memory = {"before the load": server.memory_mb()}
        client.close()  # idle through the load, the server would time its connection out
        good, good_s = run_phase(server.port, [good_request(pngs[i % len(pngs)], f"{i}.png")
                                               for i in range(args.requests)], args.clients)
        memory["after the good requests"] = server.memory_mb()
        bad, _ = run_phase(server.port, bad_requests(args.bad, pngs[0]), args.clients)
        memory["after the bad requests"] = server.memory_mb()
        # the same load again: memory that keeps climbing is a leak, a plateau is the
        # allocator keeping what it took the first time
        again, _ = run_phase(server.port, [good_request(pngs[i % len(pngs)], f"{i}.png")
                                           for i in range(args.requests // 4)], args.clients)
        bad += run_phase(server.port, bad_requests(args.bad, pngs[0]), args.clients)[0]
        memory["after a second round (a quarter of the good, all the bad)"] = server.memory_mb()
        client = Client(server.port)
        after = client.post(good_request(pngs[0]))
        client.close()
    finally:
        server.stop()
    text = report(args, good, good_s, bad, before, after, memory, again)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    passed = all(o.ok for o in [*good, *again, *bad, before, after]) and \
        same_score(before, after)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
