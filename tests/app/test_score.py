"""Score images page: uploads are scored and explained; bad files give a named error."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from core import explore
from core.data.imageio import validate_upload
from core.runs import load_run
from tests.app.helpers import open_page


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (220, 120, 20)).save(buf, format="PNG")
    return buf.getvalue()


def test_uploads_are_scored_and_broken_files_named(runs_dir: Path, tiny_run: Path):
    at = open_page("views/score.py")
    assert any("Upload one or more images" in i.value for i in at.info)
    at.file_uploader(key="score_files").set_value([
        ("good.png", _png(), "image/png"),
        ("broken.png", b"\x89PNG\r\n\x1a\nnot really", "image/png"),
    ]).run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "'broken.png'" in errors[0]
    assert [s.value for s in at.subheader] == ["good.png"]
    metrics = {m.label: m.value for m in at.metric}
    run = load_run(tiny_run)
    array = validate_upload(_png(), "good.png", size=run.config.model.image_size)
    report = explore.inspect_image(run.model, explore.hwc_to_chw(array))
    assert metrics["Anomaly score"] == f"{report.score:.3f}"  # the score of that very image
    expected = "anomalous" if report.score > float(run.model.detector.threshold) else "normal"
    assert metrics["Verdict"] == expected
    captions = [c for img in at.main.image for c in img.captions if c]  # legend has none
    scales = run.model.scales
    assert captions[0] == "image"
    kept = explore.combined_scales(run.model)  # the map names the scales it weighs
    combined = "combined" if kept == list(scales) else f"combined ({' + '.join(kept)})"
    assert [c.split(" · ")[0] for c in captions[1:len(scales) + 2]] == [*scales, combined]
    nearest = [c for c in captions if c.startswith("prototype #")]
    assert len(nearest) == 3 * len(scales)  # three nearest prototypes per scale
