"""`anomem score`: score image files and folders, for people and for scripts.

One line per image on stdout (path, score, verdict, tab-separated), optionally a CSV with each
scale's score and heat-map overlays. Folders are searched recursively for the suffixes the
loaders read; an unreadable file is skipped and named on stderr, the others are still scored.
Exit status: 2 when a file was skipped, else 1 when `fail_on_anomaly` and an image is anomalous,
else 0 — so a script can stop a line on a bad part or on a broken camera file alike.
"""

from __future__ import annotations

import csv as csv_module
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from core.data.base import DataError
from core.data.imageio import is_image_file
from core.files import atomic_path, write_atomic
from core.inference import Detector

CHUNK = 64  # images read and scored at a time: memory stays flat on large folders
EXIT_ANOMALY, EXIT_SKIPPED = 1, 2


def find_images(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(image files, in the order given and sorted within each folder, searched recursively;
    paths that do not exist). Hidden files and folders are left out of the search."""
    found, missing = [], []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p)
                            and not any(part.startswith(".") for part in
                                        p.relative_to(path).parts))
        elif path.is_file():
            found.append(path)
        else:
            missing.append(path)
    return found, missing


def score_files(detector: Detector, paths: list[Path], csv: Path | None = None,
                overlays: Path | None = None, fail_on_anomaly: bool = False) -> int:
    """Score every image under `paths`, print a line each, write the CSV and overlays; returns
    the exit status (see the module docstring)."""
    files, missing = find_images(paths)
    if missing:
        raise DataError(f"{missing[0]}: no such file or folder")
    if not files:
        raise DataError(f"no image files under {', '.join(map(str, paths))}")
    if csv is not None and not csv.parent.is_dir():
        raise DataError(f"--csv {csv}: no such folder {csv.parent}")
    info = detector.info
    rows, skipped, anomalous = [], [], 0
    with tqdm(total=len(files), desc="score", unit="img", file=sys.stderr,
              disable=None) as bar:  # no bar when stderr is not a terminal
        for start in range(0, len(files), CHUNK):
            images, kept, unreadable = detector.read_all(files[start:start + CHUNK])
            skipped += unreadable
            result = detector.score(images)
            for i, path in enumerate(kept):
                verdict = "anomaly" if result.anomalous[i] else "normal"
                anomalous += bool(result.anomalous[i])
                print(f"{path}\t{result.scores[i]:.4f}\t{verdict}", flush=True)
                rows.append([path, f"{result.scores[i]:.6f}", verdict,
                             *(f"{v:.6f}" for v in result.scale_scores[i])])
                if overlays is not None:
                    _save_overlay(detector, images[i], Path(path), result.maps[i], overlays,
                                  start + i)
            bar.update(min(CHUNK, len(files) - start))
    if csv is not None:
        _write_csv(csv, ["path", "score", "verdict", *(f"score_{s}" for s in info.scales)],
                   rows)
    for message in skipped:
        print(f"anomem: error: {message}", file=sys.stderr)
    if skipped:
        return EXIT_SKIPPED
    return EXIT_ANOMALY if fail_on_anomaly and anomalous else 0


def _save_overlay(detector: Detector, image: np.ndarray, path: Path, heat: np.ndarray,
                  folder: Path, index: int) -> None:
    """The image with its anomaly map over it; colours run from 0 to twice the pixel
    threshold, the same scale for every image. The index keeps equal file names apart."""
    from core.explore import overlay

    folder.mkdir(parents=True, exist_ok=True)
    image = overlay(image, heat, 0.0, 2 * max(detector.info.pixel_threshold, 1e-6), 0.5)
    with atomic_path(folder / f"{index:03d}_{path.stem}_overlay.png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    text = io.StringIO()
    writer = csv_module.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    write_atomic(path, text.getvalue())
