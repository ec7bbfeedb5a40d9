"""Deviation maps page: edge-case browser, overlays of every scale, position inspection."""

from __future__ import annotations

from pathlib import Path

from core import explore
from core.runs import load_run
from tests.app.helpers import images, open_page


def _scores(options: list[str]) -> list[float]:
    return [float(o.split("score ")[1].split(" ")[0]) for o in options]


def _sample_box(at):
    (box,) = [s for s in at.selectbox if s.label == "Sample"]
    return box


def _slider(at, label: str):
    (slider,) = [s for s in at.slider if s.label == label]
    return slider


def test_edge_cases_overlays_and_matched_prototype(runs_dir: Path, tiny_run: Path):
    scales = load_run(tiny_run).model.scales
    at = open_page("views/deviations.py")
    assert [t.value for t in at.title] == ["Deviation maps"]
    sample = _sample_box(at)
    assert all(" normal" in o for o in sample.options)
    assert _scores(sample.options) == sorted(_scores(sample.options), reverse=True)
    overlay_row = [c for img in images(at) for c in img.captions][:len(scales) + 2]
    assert overlay_row[0] == "image"
    kept = explore.combined_scales(load_run(tiny_run).model)  # the map names what it weighs
    combined = "combined" if kept == list(scales) else f"combined ({' + '.join(kept)})"
    assert [c.split(" · ")[0] for c in overlay_row[1:]] == [*scales, combined]
    assert "pixel threshold" in " ".join(c.value for c in at.caption)

    at.segmented_control(key="dev_case").set_value("anomaly_lowest").run()
    lowest = _sample_box(at)
    assert not any(" normal " in o for o in lowest.options)
    assert _scores(lowest.options) == sorted(_scores(lowest.options))
    at.segmented_control(key="dev_case").set_value("near_threshold").run()
    assert not at.exception
    near = _sample_box(at)
    threshold = float(load_run(tiny_run).model.detector.threshold)
    gaps = [abs(s - threshold) for s in _scores(near.options)]
    assert len(gaps) == 12 and gaps == sorted(gaps)  # nearest the threshold first
    # and no test image outside the list is nearer than the farthest in it (scores printed
    # with 3 decimals: compare at that precision)
    all_scores = _all_test_scores(tiny_run)
    outside = sorted(abs(all_scores - threshold))[12:]
    assert not outside or min(outside) >= max(gaps) - 1e-3

    at.selectbox(key="dev_pos_scale").set_value(scales[-1]).run()
    _slider(at, "Row").set_value(0).run()
    _slider(at, "Column").set_value(1).run()
    assert not at.exception
    text = " ".join(m.value for m in at.markdown)
    assert f"Position (0, 1) of **{scales[-1]}** reads **prototype #" in text
    proto = text.split("reads **prototype #")[1].split("*")[0]
    captions = [c for img in images(at) for c in img.captions]
    assert any(c.startswith(f"prototype #{proto}: its top training patches") for c in captions)


def _all_test_scores(run_dir: Path):
    from core.data import load_split
    from core.train.scoring import score_images

    run = load_run(run_dir)
    return score_images(run.model, load_split(run.config.data).test.images,
                        with_maps=False).image
