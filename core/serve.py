"""Score images over HTTP: `anomem serve RUN` (a run folder or an exported .onnx model).

A small FastAPI app around one loaded `Detector`, run by uvicorn:

    GET  /health                  {"status": "ok"}
    GET  /model                   the `ModelInfo` fields, and "source" (the run or file served)
    POST /score[?maps=true]       multipart upload, one or several files in the field "files"

    curl -F files=@a.png -F files=@b.png "http://127.0.0.1:8000/score?maps=true"

`/score` answers, in upload order:

    {"threshold": 1.23,
     "results": [{"name": "a.png", "score": 0.98, "anomalous": false,
                  "scale_scores": {"layer2": 0.5, "layer3": 1.1, "layer4": 0.7}}, ...]}

and with `maps=true` each result also holds "map": the image's anomaly map at the detector's
height x width, colour-mapped as a PNG in base64, on the app's fixed colour scale (0 to twice
the pixel threshold, `core.explore.maps.heat_range`; 0 to 3 when the run has none).

Each file is checked as the app checks uploads (`validate_upload`: type, bytes, declared
pixels). One bad file refuses the whole request, with {"detail": "<message naming the file>"}:
413 for a file over the byte or pixel cap (or more than `max_files` files), 415 for an
unsupported file type, 422 for a file that is not a readable image. Nothing is kept from a
refused request, so the service goes on serving.

Requests share the model through one worker thread, the only one that calls the detector
(PyTorch and onnxruntime calls never run concurrently on it): it takes the queued requests'
images, waiting a few milliseconds for more, and scores up to `max_batch` of them in one call.

The service binds to 127.0.0.1 by default: it has no authentication, so only this machine
may reach it unless `host` is set on purpose (e.g. "0.0.0.0" behind a proxy that adds it).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import queue
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, HTTPException, UploadFile
from PIL import Image
from starlette.concurrency import run_in_threadpool

from core.data.base import DataError
from core.data.imageio import IMAGE_SUFFIXES, MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS, validate_upload
from core.explore.maps import colourise
from core.inference import Detector, Result

WAIT = 0.005  # seconds the worker waits for more requests to fill a batch


@dataclass
class _Job:
    images: np.ndarray  # (n, H, W, C) uint8 at the detector's size
    future: Future[Result]


class BatchScorer:
    """The one thread that calls the detector: requests queue their images, and it scores
    those of every waiting request together, up to `max_batch` images per call."""

    def __init__(self, detector: Detector, max_batch: int = 32, wait: float = WAIT) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: expected at least 1")
        self.detector, self.max_batch, self.wait = detector, max_batch, wait
        self.batches = 0  # detector calls so far: fewer than requests means they were shared
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="anomem-scorer", daemon=True)
        self._thread.start()

    def submit(self, images: np.ndarray) -> Future[Result]:
        """Queue images (n, H, W, C); the future holds their `Result`."""
        if not self._thread.is_alive():
            raise RuntimeError("the scorer is closed")
        job = _Job(images, Future())
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Score what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            jobs, n = [job], len(job.images)
            deadline = time.monotonic() + self.wait
            while n < self.max_batch:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:  # close(): stop after this batch
                    self._queue.put(None)
                    break
                jobs.append(job)
                n += len(job.images)
            self._score(jobs)

    def _score(self, jobs: list[_Job]) -> None:
        """One detector call for the jobs' images (in chunks of `max_batch` when the last job
        took it over), each job's rows back to its future."""
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # client gone
        if not jobs:
            return
        try:
            result = self.detector.score(np.concatenate([j.images for j in jobs]),
                                         batch_size=self.max_batch)
            self.batches += 1
            start = 0
            for j in jobs:
                rows = slice(start, start + len(j.images))
                start = rows.stop
                j.future.set_result(_rows(result, rows))
        except Exception as err:  # these requests fail (500), the worker goes on
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(err)


def _rows(result: Result, rows: slice) -> Result:
    """Some images' part of a batch's result (each of its arrays, sliced)."""
    return dataclasses.replace(result, **{
        f.name: value[rows] for f in dataclasses.fields(result)
        if isinstance(value := getattr(result, f.name), np.ndarray)})


def create_app(detector: Detector, max_batch: int = 32, max_files: int = 64, *,
               max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_UPLOAD_PIXELS,
               wait: float = WAIT) -> FastAPI:
    """The HTTP API around a loaded detector; its `BatchScorer` lives with the app's lifespan
    (`app.state.scorer` while it runs)."""
    info = detector.info
    size = (info.height, info.width)
    vmax = 2 * info.pixel_threshold if info.pixel_threshold > 0 else 3.0  # as heat_range

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.scorer = BatchScorer(detector, max_batch, wait)
        yield
        app.state.scorer.close()

    app = FastAPI(title="AnoMem scoring service", lifespan=lifespan)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model")
    def model() -> dict:
        return {**dataclasses.asdict(info), "source": detector.source}

    @app.post("/score")
    async def score(files: Annotated[list[UploadFile], File(description="image files")],
                    maps: bool = False) -> dict:
        if len(files) > max_files:
            raise HTTPException(413, f"{len(files)} files: at most {max_files} per request")
        uploads = [(f.filename or "", await _read(f, max_bytes)) for f in files]
        images = await run_in_threadpool(decode, uploads)
        result = await asyncio.wrap_future(app.state.scorer.submit(images))
        results = [{"name": name, "score": float(result.scores[i]),
                    "anomalous": bool(result.anomalous[i]),
                    "scale_scores": dict(zip(info.scales, result.scale_scores[i].tolist(),
                                             strict=True))}
                   for i, (name, _) in enumerate(uploads)]
        if maps:
            pngs = await run_in_threadpool(_pngs, result.maps, vmax)
            for entry, png in zip(results, pngs, strict=True):
                entry["map"] = png
        return {"threshold": info.threshold, "results": results}

    def decode(uploads: list[tuple[str, bytes]]) -> np.ndarray:
        """The uploads as uint8 (n, H, W, C), or the HTTP error naming the first bad one."""
        images = []
        for name, data in uploads:
            try:
                images.append(validate_upload(data, name, max_bytes, max_pixels, size,
                                              info.channels))
            except DataError as err:
                raise HTTPException(_status(name, str(err)), str(err)) from None
        return np.stack(images)

    return app


async def _read(upload: UploadFile, max_bytes: int) -> bytes:
    """The file's bytes; a file over the cap is refused (413) without reading it all."""
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:  # the words of validate_upload's refusal
        raise HTTPException(413, f"cannot read image {upload.filename or ''!r}: "
                                 f"{(upload.size or len(data)) / 1e6:.1f} MB is over the limit "
                                 f"of {max_bytes / 1e6:.1f} MB")
    return data


def _status(name: str, message: str) -> int:
    """The status of a `validate_upload` refusal: 415 for a file type not accepted, 413 over
    the pixel cap (or PIL's decompression-bomb limit), 422 for an unreadable image."""
    if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        return 415
    return 413 if "over the limit" in message or "decompression bomb" in message else 422


def _pngs(maps: np.ndarray, vmax: float) -> list[str]:
    """Anomaly maps (N, H, W) -> base64 PNGs, colour-mapped from 0 to `vmax`."""
    return [_png(colourise(m, 0.0, vmax)) for m in maps]


def _png(rgb: np.ndarray) -> str:
    """uint8 (H, W, 3) -> a base64 PNG."""
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          max_batch: int = 32, max_files: int = 64, log_level: str = "warning") -> None:
    """Load a run folder or an exported .onnx model and serve it until interrupted."""
    import uvicorn

    detector = Detector.load(path, device)
    info = detector.info
    print(f"anomem: serving {detector.source} ({info.backbone}, {info.dataset}"
          f"{'/' + info.normal_class if info.normal_class else ''}, threshold "
          f"{info.threshold:.4g}) on http://{host}:{port}", flush=True)
    uvicorn.run(create_app(detector, max_batch, max_files), host=host, port=port,
                log_level=log_level)
