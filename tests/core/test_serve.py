"""core/serve.py: the HTTP scoring service, end to end on a saved tiny run, and on a stub back
end where batching and failures must be seen."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from core.config import ModelConfig, RunConfig
from core.data.imageio import validate_upload
from core.explore.maps import colourise
from core.inference import Detector
from core.model.anomem import AnoMem
from core.runs import save_model
from core.serve import BatchScorer, create_app, serve

if TYPE_CHECKING:
    import httpx  # what TestClient answers with

TINY = ModelConfig(image_size=32, width=0.125, memory_size=8, memory_dim=8, head_dim=8)


@pytest.fixture(scope="module")
def run_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `anomem train` leaves it (untrained weights: the numbers are what
    matter here, not their quality)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("runs") / "tiny"
    save_model(path, RunConfig(model=TINY), AnoMem(TINY))
    return path


@pytest.fixture(scope="module")
def detector(run_path: Path) -> Detector:
    return Detector.load(run_path, "cpu")


def png(seed: int | None = None, height: int = 40, width: int = 30, grey: int = 128) -> bytes:
    """A PNG of noise (seed given) or of one grey level."""
    if seed is None:
        array = np.full((height, width, 3), grey, np.uint8)
    else:
        array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def post(client: TestClient, files: list[tuple[str, bytes]], maps: bool = False
         ) -> httpx.Response:
    return client.post("/score", params={"maps": maps},
                       files=[("files", (name, data, "application/octet-stream"))
                              for name, data in files])


def decoded(detector: Detector, files: list[tuple[str, bytes]]) -> np.ndarray:
    info = detector.info
    return np.stack([validate_upload(data, name, size=(info.height, info.width),
                                     channels=info.channels) for name, data in files])


def stub(detector: Detector, delay: float = 0.0, fail_first: bool = False
         ) -> tuple[Detector, list[int]]:
    """A grey detector whose score is an image's mean level; it records each batch's size and
    takes `delay` seconds per call, so concurrent requests pile up behind it."""
    sizes: list[int] = []

    def backend(batch: np.ndarray) -> tuple[np.ndarray, ...]:  # (N, 1, H, W)
        sizes.append(len(batch))
        time.sleep(delay)
        if fail_first and len(sizes) == 1:
            raise RuntimeError("the back end failed")
        scores = batch.mean((1, 2, 3))
        return scores, scores > 0.5, scores[:, None], batch[:, 0], batch

    info = dataclasses.replace(detector.info, channels=1, scales=("grey",), threshold=0.5)
    return Detector(info, backend, "stub"), sizes


@pytest.mark.parametrize("n", [1, 3])
def test_scores_match_the_detector(detector: Detector, n: int) -> None:
    files = [(f"img{i}.png", png(seed=i)) for i in range(n)]
    expected = detector.score(decoded(detector, files))
    with TestClient(create_app(detector)) as client:
        response = post(client, files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["threshold"] == detector.info.threshold
    assert [r["name"] for r in body["results"]] == [name for name, _ in files]
    np.testing.assert_allclose([r["score"] for r in body["results"]], expected.scores,
                               rtol=1e-5, atol=1e-6)
    assert [r["anomalous"] for r in body["results"]] == expected.anomalous.tolist()
    per_scale = [[r["scale_scores"][s] for s in detector.info.scales] for r in body["results"]]
    np.testing.assert_allclose(per_scale, expected.scale_scores, rtol=1e-5, atol=1e-6)
    assert all("map" not in r for r in body["results"])


def test_maps_are_pngs_of_the_anomaly_map(detector: Detector) -> None:
    files = [("a.png", png(seed=1)), ("b.png", png(seed=2, height=64, width=64))]
    expected = detector.score(decoded(detector, files))
    info = detector.info
    vmax = 2 * info.pixel_threshold if info.pixel_threshold > 0 else 3.0
    with TestClient(create_app(detector)) as client:
        response = post(client, files, maps=True)
    assert response.status_code == 200, response.text
    for result, heat in zip(response.json()["results"], expected.maps, strict=True):
        image = Image.open(io.BytesIO(base64.b64decode(result["map"])))
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == (info.width, info.height)
        # the colours of the detector's own map (off by a step of the colour table at most)
        diff = np.abs(np.asarray(image, np.int16) - colourise(heat, 0.0, vmax).astype(np.int16))
        assert diff.max() <= 8


def test_concurrent_requests_share_batches(detector: Detector) -> None:
    grey, sizes = stub(detector, delay=0.1)
    app = create_app(grey)
    levels = [10 * (i + 1) for i in range(8)]
    start = threading.Barrier(len(levels))

    def request(level: int) -> httpx.Response:
        start.wait()
        return post(client, [(f"{level}.png", png(grey=level)), ("black.png", png(grey=0))])

    with TestClient(app) as client, ThreadPoolExecutor(len(levels)) as pool:
        responses = list(pool.map(request, levels))
        batches = app.state.scorer.batches
    for level, response in zip(levels, responses, strict=True):
        assert response.status_code == 200, response.text
        scores = [r["score"] for r in response.json()["results"]]
        np.testing.assert_allclose(scores, [level / 255, 0.0], atol=1e-6)
    assert batches == len(sizes) < len(levels)  # some requests were scored together
    assert max(sizes) > 2 and sum(sizes) == 2 * len(levels)


def test_a_request_over_max_batch_is_scored_in_chunks(detector: Detector) -> None:
    grey, sizes = stub(detector)
    levels = [0, 51, 102, 153, 204]
    with TestClient(create_app(grey, max_batch=2)) as client:
        response = post(client, [(f"{v}.png", png(grey=v)) for v in levels])
    assert response.status_code == 200, response.text
    np.testing.assert_allclose([r["score"] for r in response.json()["results"]],
                               [v / 255 for v in levels], atol=1e-6)
    assert [r["anomalous"] for r in response.json()["results"]] == [v > 127 for v in levels]
    assert max(sizes) <= 2 and sum(sizes) == len(levels)


def test_a_cancelled_request_is_left_out(detector: Detector) -> None:
    grey, sizes = stub(detector, delay=0.3)
    scorer = BatchScorer(grey, wait=0.0)
    try:
        first = scorer.submit(np.full((1, 32, 32, 1), 51, np.uint8))
        while not sizes:  # until the worker is busy with `first`: the others wait in the queue
            time.sleep(0.001)
        gone = scorer.submit(np.zeros((2, 32, 32, 1), np.uint8))
        kept = scorer.submit(np.full((3, 32, 32, 1), 102, np.uint8))
        assert gone.cancel()
        np.testing.assert_allclose(kept.result(5).scores, [0.4] * 3, atol=1e-6)
        np.testing.assert_allclose(first.result(5).scores, [0.2], atol=1e-6)
    finally:
        scorer.close()
    assert sizes == [1, 3]


GOOD = ("good.png", png(grey=90, height=20, width=20))


@pytest.mark.parametrize(("files", "status", "needles"), [
    ([("broken.png", b"\x89PNG\r\n\x1a\n not an image")], 422, ["'broken.png'"]),
    ([("notes.txt", GOOD[1])], 415, ["'notes.txt'", "not supported"]),
    ([("big.png", png(seed=3))], 413, ["'big.png'", "over the limit"]),  # > 2000 bytes
    ([("wide.png", png(grey=7, height=60, width=60))], 413, ["'wide.png'", "3600 pixels"]),
    ([GOOD, ("empty.png", b"")], 422, ["'empty.png'", "empty file"]),
    ([GOOD, GOOD, GOOD], 413, ["3 files", "at most 2"]),
])
def test_a_bad_request_is_refused_and_the_service_goes_on(
        detector: Detector, files: list[tuple[str, bytes]], status: int,
        needles: list[str]) -> None:
    app = create_app(detector, max_files=2, max_bytes=2000, max_pixels=50 * 50)
    with TestClient(app) as client:
        response = post(client, files)
        assert response.status_code == status, response.text
        detail = response.json()["detail"]
        for needle in needles:
            assert needle in detail, (needle, detail)
        good = post(client, [GOOD])
    assert good.status_code == 200, good.text
    assert good.json()["results"][0]["name"] == "good.png"


def test_a_request_without_files_is_refused(detector: Detector) -> None:
    with TestClient(create_app(detector)) as client:
        assert client.post("/score").status_code == 422


def test_a_failing_back_end_fails_its_request_only(detector: Detector) -> None:
    grey, _ = stub(detector, fail_first=True)
    with TestClient(create_app(grey), raise_server_exceptions=False) as client:
        assert post(client, [GOOD]).status_code == 500
        again = post(client, [GOOD])
    assert again.status_code == 200, again.text
    assert again.json()["results"][0]["score"] == pytest.approx(90 / 255, abs=1e-6)


def test_health_and_model(detector: Detector, run_path: Path) -> None:
    with TestClient(create_app(detector)) as client:
        assert client.get("/health").json() == {"status": "ok"}
        model = client.get("/model").json()
    assert model == {**json.loads(json.dumps(dataclasses.asdict(detector.info))),
                     "source": str(run_path)}
    assert model["height"] == model["width"] == 32 and model["channels"] == 3


def test_the_worker_stops_with_the_app(detector: Detector) -> None:
    app = create_app(detector)
    with TestClient(app):
        scorer = app.state.scorer
    with pytest.raises(RuntimeError, match="closed"):
        scorer.submit(np.zeros((1, 32, 32, 3), np.uint8))


def test_serve_listens_on_localhost_by_default(run_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    serve(run_path, port=8765, device="cpu")
    (app, kwargs), = calls
    assert kwargs["host"] == "127.0.0.1" and kwargs["port"] == 8765
    assert {route.path for route in app.routes} >= {"/score", "/health", "/model"}
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and str(run_path) in line and "http://127.0.0.1:8765" in line
