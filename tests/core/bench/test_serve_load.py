"""benchmarks/serve_load.py: its requests, sent to the real app in process (no uvicorn), get
the answers the load test expects, and its classification of answers is strict."""

from __future__ import annotations

import importlib.util
import io
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from core.config import ModelConfig, RunConfig
from core.data.imageio import MAX_UPLOAD_BYTES
from core.inference import Detector
from core.model.anomem import AnoMem
from core.runs import save_model
from core.serve import create_app

TINY = ModelConfig(image_size=32, width=0.125, memory_size=8, memory_dim=8, head_dim=8)


@pytest.fixture(scope="module")
def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "serve_load", Path(__file__).parents[3] / "benchmarks" / "serve_load.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("runs") / "tiny"
    save_model(path, RunConfig(model=TINY), AnoMem(TINY))
    with TestClient(create_app(Detector.load(path, "cpu"))) as c:
        yield c


def png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), np.uint8)).save(
        out, format="PNG")
    return out.getvalue()


def send(client: TestClient, request: Any) -> tuple[int, bytes]:
    """Post one of the script's `Request`s, as it would, to the app in process."""
    r = client.post("/score", content=request.body,
                    headers={"Content-Type": request.content_type})
    return r.status_code, r.content


def test_every_request_gets_what_the_load_test_expects(load: ModuleType,
                                                       client: TestClient) -> None:
    image = png()
    status, body = send(client, load.good_request(image))
    ok, score, note = load.classify("good", status, body)
    assert ok and np.isfinite(score) and note == ""
    bad = load.bad_requests(10, image)
    assert [r.kind for r in bad] == list(load.KINDS) * 2
    oversized = [r for r in bad if r.kind == "oversized"]
    assert all(MAX_UPLOAD_BYTES < len(r.body) < MAX_UPLOAD_BYTES + 2**21 for r in oversized)
    malformed = {r.content_type.split(";")[0] for r in bad if r.kind == "malformed form"}
    assert malformed == {"multipart/form-data", "application/json"}  # both ways
    for request in bad:
        status, body = send(client, request)
        assert status == load.EXPECTED[request.kind], (request.kind, body)
        assert load.classify(request.kind, status, body) == (True, None, "")
    status, body = send(client, load.good_request(image))  # the service goes on
    assert load.classify("good", status, body)[1] == score


@pytest.mark.parametrize(("kind", "status", "body", "ok"), [
    ("good", 200, {"results": [{"score": 1.5}]}, True),
    ("good", 200, {"results": [{"score": 1.5}, {"score": 2.0}]}, False),  # one image, one score
    ("good", 200, {"results": [{"score": None}]}, False),
    ("good", 500, {"detail": "boom"}, False),
    ("good", 200, b"<html>", False),
    ("empty", 422, {"detail": "cannot read image 'e.png': empty file"}, True),
    ("malformed form", 422, {"detail": [{"loc": ["body", "files"]}]}, True),
    ("empty", 422, {"detail": ""}, False),  # a refusal must say why
    ("empty", 422, {"message": "no"}, False),
    ("oversized", 500, {"detail": "boom"}, False),  # a 5xx is not a refusal
    ("wrong type", 200, {"results": [{"score": 1.5}]}, False),
])
def test_answers_are_classified_strictly(load: ModuleType, kind: str, status: int,
                                         body: dict | bytes, ok: bool) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, score, note = load.classify(kind, status, raw)
    assert got is ok and (note == "") is ok
    assert score == (1.5 if ok and kind == "good" else None)


def test_same_score_allows_float_noise_only(load: ModuleType) -> None:
    def outcome(score: float | None):
        return load.Outcome("good", 200, 0.01, score is not None, score, "")

    assert load.same_score(outcome(4.0), outcome(4.0 + 1e-7))
    assert not load.same_score(outcome(4.0), outcome(4.01))
    assert not load.same_score(outcome(4.0), outcome(None))
