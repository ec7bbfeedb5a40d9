"""core/artefacts.py: what the pages show, saved with the run and read back unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from core import artefacts
from core.data import load_split
from core.pipeline import evaluate_run, train_run
from core.runs import WEIGHTS, load_run
from core.train.scoring import score_images
from tests.app.helpers import tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "explored"
    train_run(tiny_config(), out)
    return out


def test_training_saves_what_the_pages_show(run_dir: Path):
    assert (run_dir / artefacts.ARTEFACTS).is_file()
    run = load_run(run_dir)
    split = load_split(run.config.data)
    art = artefacts.load(run_dir)
    assert art is not None
    scored = score_images(run.model, split.test.images, with_maps=False)
    np.testing.assert_allclose(art.scored.image, scored.image, rtol=1e-6)
    for s in run.model.scales:
        np.testing.assert_allclose(art.scored.per_scale[s], scored.per_scale[s], rtol=1e-6)
        points = art.umap[s]
        assert points.samples.shape == (len(points.index), 2)
        assert points.prototypes.shape == (run.model.cfg.memory_size, 2)
        assert np.isfinite(points.samples).all()
        patches = art.patches[s]
        assert patches.size == run.model.cfg.memory_size
        assert int(patches.usage.sum()) > 0
        gallery = artefacts.gallery_index(split, run.config.data.seed)
        h, w = patches.map_size
        for hits in patches.hits:
            assert len(hits) <= artefacts.PATCHES_PER_PROTOTYPE
            assert [x.weight for x in hits] == sorted((x.weight for x in hits), reverse=True)
            assert all(0 <= x.image < len(gallery) and 0 <= x.row < h and 0 <= x.col < w
                       for x in hits)
    assert set(art.scored.terms) == set(scored.terms)


def test_artefacts_of_other_weights_or_a_damaged_file_are_computed_again(
        run_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    copy = Path(shutil.copytree(run_dir, tmp_path / "copy"))
    assert artefacts.load(copy) is not None
    weights = (copy / WEIGHTS).read_bytes()
    (copy / WEIGHTS).write_bytes(weights + b" ")  # other bytes: another model, as far as we know
    assert artefacts.load(copy) is None
    (copy / WEIGHTS).write_bytes(weights)
    (copy / artefacts.ARTEFACTS).write_bytes(b"not a safetensors file")
    assert artefacts.load(copy) is None
    assert "cannot be read" in caplog.text
    run = load_run(copy)
    art = artefacts.ensure(copy, run.model, load_split(run.config.data), run.config.data.seed)
    assert artefacts.load(copy) is not None  # computed and saved
    np.testing.assert_allclose(art.scored.image, artefacts.load(copy).scored.image)


def test_evaluate_writes_them_for_an_older_run(run_dir: Path, tmp_path: Path):
    copy = Path(shutil.copytree(run_dir, tmp_path / "older"))
    (copy / artefacts.ARTEFACTS).unlink()
    evaluate_run(copy)
    assert artefacts.load(copy) is not None
