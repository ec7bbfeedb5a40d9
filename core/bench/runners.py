"""`anomem bench`: AnoMem, its ablations and its peers on the same splits, side by side.

`bench` runs every method of every planned cell (core.bench.suites) that results.csv lacks,
and rewrites results.csv and results.md after each (core.bench.results, core.bench.tables).
Every method is a `Method`: AnoMem (`AnoMemMethod`) and each peer (`PeerMethod`, over the
detectors of core.bench.peers and core.bench.feature_peers) run the same way, on the same
split. AnoMem's run folders are kept under `runs/`, so its ablations come from the very model
that was benchmarked, and a rerun reuses (or resumes) them instead of training again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from core.bench.ablations import deviation_norm_scores, encoder_knn_scores
from core.bench.feature_peers import make_feature_peers
from core.bench.peers import DeepSVDD, MapPeer, Peer, make_peers
from core.bench.results import ANOMEM, Results, make_row
from core.bench.suites import BenchOptions, Cell, Say, cifar_source, plan
from core.bench.tables import render_markdown
from core.config import DataConfig, RunConfig
from core.data import Split, load_split
from core.files import write_atomic
from core.metrics import image_metrics, pixel_auroc
from core.model.anomem import AnoMem
from core.pipeline import resume_run, train_run
from core.presets import PRETRAINED_INPUT, run_config
from core.runs import (
    FINISHED,
    METRICS,
    STOPPED,
    TRAINING,
    RunError,
    delete_run,
    load_run,
    read_json,
    run_state,
    write_json,
)
from core.train.scoring import score_images
from core.train.trainer import Progress


class Method(Protocol):
    """A column of the benchmark: run on a cell's split, it gives its rows."""

    name: str  # the method its first row names: what results.csv is asked for

    def run(self, cell: Cell, split: Split, say: Say) -> list[dict]: ...


@dataclass
class AnoMemMethod:
    """AnoMem under the benchmark's options; its rows: its own, then its ablations'."""

    opts: BenchOptions
    name: str = ANOMEM

    def run(self, cell: Cell, split: Split, say: Say) -> list[dict]:
        return list(run_anomem(cell, split, self.opts, say))


@dataclass
class PeerMethod:
    """A peer detector, fitted and scored on the cell's split: one row."""

    peer: Peer

    @property
    def name(self) -> str:
        return self.peer.name

    def run(self, cell: Cell, split: Split, say: Say) -> list[dict]:
        return [run_peer(cell, split, self.peer)]


def methods_for(cell: Cell, opts: BenchOptions) -> list[Method]:
    """AnoMem, then the cell's peers (`peers_for`)."""
    return [AnoMemMethod(opts), *(PeerMethod(p) for p in peers_for(cell, opts))]


def bench(opts: BenchOptions, say: Say = print) -> Results:
    """Run every missing (cell, method) of the plan; returns the results so far."""
    opts.out.mkdir(parents=True, exist_ok=True)
    results = Results.load(opts.out / "results.csv")
    cells = plan(opts, say)
    todo = [(c, m.name) for c in cells for m in methods_for(c, opts)
            if not results.has(c, m.name)]
    say(f"{len(cells)} cells, {len(todo)} (cell, method) pairs to run, "
        f"{opts.minutes:g} min training budget each")
    if "speed" in opts.suites:
        run_speed(opts, say)
    done = 0
    for cell in cells:
        methods = [m for m in methods_for(cell, opts) if not results.has(cell, m.name)]
        if not methods:
            continue
        # read as AnoMem's config reads it (the preset may set the size, as the CLI does): every
        # method of the cell sees the same images
        split = load_split(anomem_config(cell, opts).data)
        for method in methods:
            done += 1
            say(f"[{done}/{len(todo)}] {cell.label} · {method.name} …")
            start = time.perf_counter()
            try:
                rows = method.run(cell, split, say)
            except RunError as err:  # a run folder another process holds: left as it is
                say(f"    skipped: {err}")
                continue
            for row in rows:
                results.add(row)
            write_atomic(opts.out / "results.md", render_markdown(results, opts))
            say(f"    AUROC {rows[0]['auroc']:.3f} ({time.perf_counter() - start:.0f} s)")
    write_atomic(opts.out / "results.md", render_markdown(results, opts))
    return results


# ---------------------------------------------------------------------------------------------
# AnoMem and its ablations


def anomem_config(cell: Cell, opts: BenchOptions) -> RunConfig:
    """The benchmark's preset on the cell within its time budget (`run_config`'s epoch rule:
    a from-scratch encoder trains until the budget is spent, a frozen one stops at the
    preset's epochs)."""
    return run_config(opts.preset, cell.data(opts.seed), minutes=opts.minutes, seed=opts.seed,
                      device=opts.device, overrides=opts.overrides)


def scored_row(cell: Cell, method: str, kind: str, labels: np.ndarray, scores: np.ndarray,
               types: list[str], train_s: float | None, note: str = "",
               pixel: float | None = None) -> dict:
    """The row of a method that scored the cell's test images: AUROC, and per anomaly type."""
    m = image_metrics(labels, scores, types)
    return make_row(cell, method, kind, m["auroc"], pixel_auroc=pixel,
                    by_type=m["auroc_by_type"], train_s=train_s, note=note)


def run_anomem(cell: Cell, split: Split, opts: BenchOptions, say: Say = print
               ) -> Iterator[dict]:
    """Train (or reuse, or resume) AnoMem on the cell; yield its row and its ablations' rows."""
    out = opts.out / "runs" / cell.slug
    last = [time.monotonic()]

    def progress(p: Progress) -> None:  # a line every half minute, not a bar per cell
        if time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            say(f"    {p.stage} {p.done:.0%}: {p.message}")

    state = run_state(out) if out.exists() else None
    if state == TRAINING:
        raise RunError(f"{out}: another process is training this run")
    if state == FINISHED:
        metrics = read_json(out / METRICS)
    else:
        metrics = None
        if state == STOPPED:
            say(f"    resuming {out}")
            try:
                metrics = resume_run(out, progress)
            except RunError as err:  # damaged, written by another version, or taken meanwhile
                say(f"    cannot resume ({err}): training again")
        if metrics is None:
            if out.exists():  # a run that died before it could be resumed; refused, with its
                delete_run(out)  # folder untouched, if another process took it meanwhile
            metrics = train_run(anomem_config(cell, opts), out, progress, split=split,
                                explore=False)  # the benchmark opens no page
    test, labels = split.test, split.test.labels.numpy()
    train_s = metrics.get("train_seconds")
    yield make_row(cell, ANOMEM, "ours", metrics["auroc"],
                   pixel_auroc=metrics.get("pixel_auroc"), by_type=metrics["auroc_by_type"],
                   train_s=train_s, note=f"{len(read_history_epochs(out))} epochs")
    for scale, value in metrics["auroc_by_scale"].items():
        yield make_row(cell, f"AnoMem, {scale} only", "ablation", value, train_s=train_s,
                       note="same model, one scale's score")
    model = load_run(out).model
    device = "cuda" if opts.device != "cpu" and torch.cuda.is_available() else "cpu"
    if not model.frozen:  # on a frozen encoder, DN2 and the scale ablations say as much, and
        # each of these passes every test image through the encoder again
        normals = split.train.images[split.train.labels == 0]
        knn = encoder_knn_scores(model, normals, test.images, device=device)
        yield scored_row(cell, "AnoMem, no memory (encoder + kNN)", "ablation", labels, knn,
                         test.types, None, "same encoder, pooled queries, cosine kNN k=2")
        dev = deviation_norm_scores(model, test.images, device=device)
        yield scored_row(cell, "AnoMem, no stage 2 (deviation norm)", "ablation", labels,
                         dev, test.types, None, "same memory, mean |q - r|, no detector")
    yield from _combination_rows(cell, model, metrics, split, device)


def _combination_rows(cell: Cell, model: AnoMem, metrics: dict, split: Split, device: str
                      ) -> Iterator[dict]:
    """Stage 2's candidate weightings, and each term alone, on the benchmarked model."""
    weights = (metrics.get("stage2") or {}).get("weights")
    if not weights:  # a run from before the report
        return
    test, labels = split.test, split.test.labels.numpy()
    scored = score_images(model, test.images, device, with_maps=False)
    names = model.detector.term_names
    z = np.stack([scored.terms[n] for n in names], 1)
    chosen = metrics["stage2"].get("chosen")
    for rule, w in weights.items():
        note = "same model, one-class weights" + (" (chosen)" if rule == chosen else "")
        yield scored_row(cell, f"AnoMem, {rule} weights", "ablation", labels,
                         z @ np.array([w[n] for n in names]), test.types, None, note)
    for j, name in enumerate(names):
        yield scored_row(cell, f"AnoMem, {name} only", "ablation", labels, z[:, j],
                         test.types, None, "same model, one standardised term")


def read_history_epochs(out: Path) -> list[int]:
    file = out / "history.jsonl"
    if not file.is_file():
        return []
    return [json.loads(line)["epoch"] for line in file.read_text().splitlines() if line]


# ---------------------------------------------------------------------------------------------
# the peers


def feature_input_size(cell: Cell, opts: BenchOptions) -> int:
    """The side AnoMem's pretrained encoder reads the cell's images at; for an AnoMem set to a
    from-scratch encoder (no input size), the side the pretrained preset would use."""
    model = anomem_config(cell, opts).model
    return model.input_size or max(PRETRAINED_INPUT, model.image_size)


def peers_for(cell: Cell, opts: BenchOptions) -> list[Peer]:
    """All peers one-class, those on AnoMem's pretrained features last; only Deep SAD (Deep
    SVDD given the labels) when unbalanced: the other peers ignore labels and would repeat
    their one-class numbers."""
    device = "cuda" if opts.device != "cpu" and torch.cuda.is_available() else "cpu"
    if cell.setting == "unbalanced":
        return [DeepSVDD(minutes=opts.minutes, seed=opts.seed, device=device, labelled=True)
                ] if opts.deep_peer else []
    peers = make_peers(opts.minutes, opts.seed, device)
    if not opts.deep_peer:
        peers = [p for p in peers if not isinstance(p, DeepSVDD)]
    if opts.feature_peers:
        peers += make_feature_peers(feature_input_size(cell, opts), opts.seed, device)
    return peers


def run_peer(cell: Cell, split: Split, peer: Peer) -> dict:
    """Fit the peer on the training split, score the test split; the row has pixel AUROC too
    when the peer gives anomaly maps and the test images have masks."""
    train, test = split.train, split.test
    normals = train.images[train.labels == 0]
    anomalies = train.images[train.labels == 1]
    start = time.perf_counter()
    peer.fit(normals, anomalies if len(anomalies) else None)
    fit_s = time.perf_counter() - start
    scores = peer.score(test.images)
    pixel = None
    if isinstance(peer, MapPeer) and test.masks is not None:
        pixel = pixel_auroc(peer.maps(test.images), test.masks.numpy(),
                            test.types)["pixel_auroc"]
    return scored_row(cell, peer.name, "peer", test.labels.numpy(), scores, test.types,
                      fit_s, pixel=pixel)


# ---------------------------------------------------------------------------------------------
# the speed suite


def run_speed(opts: BenchOptions, say: Say) -> None:
    """speed.json: the step costs, the scoring rate of each encoder ("pretrained": the
    pretrained one's), then a saved detector of each scored with PyTorch and onnxruntime
    ("deployed"). Each part is written as it is done; a rerun times only what the file lacks
    (delete it to time everything again)."""
    from core.bench.speed import BATCHES, deployed_rate, inference_rate, measure

    file = opts.out / "speed.json"
    speed = read_json(file) if file.is_file() else {}
    if {"pretrained", "deployed"} <= speed.keys():
        return
    cifar = cifar_source(opts.data_root)
    data = (DataConfig(dataset=cifar[0], root=cifar[1], max_train=1024, seed=opts.seed)
            if cifar else DataConfig(seed=opts.seed))
    split = load_split(data)
    cfg = run_config("scratch", data, device=opts.device)  # stage-1 steps: what stage 1 trains
    pretrained = run_config("quick", data, device=opts.device)
    if not speed:
        say(f"speed: timing stage-1 steps on {data.dataset} ({cfg.model.image_size} px)")
        report = measure(cfg, split.train.images)
        speed = {**report.as_dict(), "dataset": data.dataset, "image_size": cfg.model.image_size}
    if "pretrained" not in speed:
        speed["pretrained"] = {"inference_images_per_s": inference_rate(
            pretrained, split.train.images), "input_size": pretrained.model.input_size}
        write_json(file, speed)
    if "deployed" not in speed:
        say(f"speed: exporting each encoder to ONNX, scoring at batch "
            f"{' and '.join(map(str, BATCHES))} with PyTorch and onnxruntime")
        speed["deployed"] = {name: deployed_rate(c, split.train.images).as_dict()
                             for name, c in (("scratch", cfg), ("pretrained", pretrained))}
        write_json(file, speed)
