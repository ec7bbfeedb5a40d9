"""`anomem`: the headless front end (datasets, train, evaluate, bench, refit, report, score,
export, serve).

Bad input ends with one line on stderr naming the thing and what was expected, and exit
status 2; no traceback. The CLI only builds a run's config (core.presets.run_config, as the app
and the benchmark do) and calls the same pipeline as the app.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import warnings
from pathlib import Path

from core.bench.suites import DEFAULT_SUITES, SUITES
from core.config import SETTINGS, ConfigError, DataConfig, RunConfig
from core.presets import PRESETS, run_config

EXIT_BAD_INPUT = 2


class CliError(Exception):
    """A user error the CLI reports in one line."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anomem",
        description="Multi-scale contrasted-memory anomaly detection (AnoMem).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("datasets", help="list the data sets and their classes")
    d.add_argument("--data-root", help="also list the classes found under this folder")

    t = sub.add_parser("train", help="train both stages, evaluate, write RUN_DIR")
    t.add_argument("--dataset", default="shapes",
                   choices=["shapes", "digits", "folder", "mvtec", "cifar10", "cifar100"])
    t.add_argument("--data-root")
    t.add_argument("--normal-class")
    t.add_argument("--setting", default="one-class", choices=SETTINGS)
    t.add_argument("--anomaly-ratio", type=float, default=0.05,
                   help="unbalanced: labelled anomalies per normal training image")
    t.add_argument("--anomaly-classes", default="",
                   help="unbalanced: comma-separated classes or types to draw them from")
    t.add_argument("--preset", default="quick", choices=PRESETS)
    t.add_argument("--epochs", type=int, help="override the preset's epoch count")
    t.add_argument("--max-minutes", type=float,
                   help="wall-clock budget for both stages (without --epochs, a from-scratch "
                        "encoder trains until it is spent, a pretrained one stops at the "
                        "preset's epochs or earlier)")
    t.add_argument("--image-size", type=int, help="working resolution (default: the data set's)")
    t.add_argument("--max-train", type=int, help="cap on normal training images")
    t.add_argument("--shift-fraction", type=float,
                   help="share of a batch's normals that get a shifted copy (default 1; "
                        "lower is a cheaper step)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any other setting of the config, e.g. model.rotation=true "
                        "(repeatable)")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", help="run folder to create (must not hold a run)")
    t.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a stopped run from its checkpoint, with its own settings")
    t.add_argument("--no-explore", dest="explore", action="store_false",
                   help="skip the explorer's galleries and UMAP views (the app computes them "
                        "on the run's first visit)")

    e = sub.add_parser("evaluate", help="recompute RUN_DIR/metrics.json")
    e.add_argument("run_dir")
    e.add_argument("--device", default="cpu", choices=["cpu", "cuda"])

    b = sub.add_parser("bench", help="AnoMem, its ablations and its peers side by side "
                                     "(resumable; writes results.csv and results.md)")
    b.add_argument("--out", default="benchmarks", help="folder of results and runs")
    b.add_argument("--minutes", type=float, default=5.0,
                   help="training budget of each trained method per cell (default 5)")
    b.add_argument("--suites", default=",".join(DEFAULT_SUITES),
                   help=f"comma-separated, from {', '.join(SUITES)} (default: all but general)")
    b.add_argument("--data-root", help="folder holding cifar10/, mvtec_ad/bottle/, "
                   "fashion_mnist/ and kolektorsdd/")
    b.add_argument("--path", action="append", default=[],
                   help="also a class-folder data set or an MVTec-layout category (repeatable)")
    b.add_argument("--classes", default="",
                   help="comma-separated normal classes to run (default: all)")
    b.add_argument("--unbalanced-class", help="normal class of the unbalanced suite")
    b.add_argument("--anomaly-class", help="class its labelled anomalies come from")
    b.add_argument("--ratios", default="0.01,0.05,0.1",
                   help="labelled anomalies per normal training image")
    b.add_argument("--per-set", type=int, default=3,
                   help="general suite: normal classes per class-folder data set (default 3)")
    b.add_argument("--no-deep-peer", action="store_true",
                   help="leave out Deep SVDD / Deep SAD (each takes the whole budget per cell)")
    b.add_argument("--no-feature-peers", action="store_true",
                   help="leave out DN2, PaDiM and PatchCore on AnoMem's pretrained features")
    b.add_argument("--preset", default="quick", choices=PRESETS,
                   help="AnoMem's preset (results are keyed without it: give each its own "
                        "--out)")
    b.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="a setting for every AnoMem run, e.g. model.rotation=true (repeatable; "
                        "results are keyed without it: give a variant its own --out)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    r = sub.add_parser("refit", help="teach RUN_DIR marked images (lessons for their "
                       "look-alikes), as a new run")
    r.add_argument("run_dir")
    r.add_argument("--normal", nargs="+", default=[], metavar="FILE",
                   help="images the detector wrongly flags (false alarms)")
    r.add_argument("--anomaly", nargs="+", default=[], metavar="TYPE=FILE",
                   help="anomalies it should catch, each with its type")
    r.add_argument("--out", required=True, help="folder of the new run")
    r.add_argument("--device", default="cpu", choices=["cpu", "cuda"])

    rp = sub.add_parser("report", help="RUN_DIR's findings as one self-contained HTML file, "
                                       "with a CSV of per-image scores beside it")
    rp.add_argument("run_dir")
    rp.add_argument("--out", required=True, help="the HTML file to write (the CSV takes its "
                                                 "name, .csv)")
    rp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])

    s = sub.add_parser(
        "score", help="score image files and folders: one line per image (path, score, verdict)",
        description="Score images with a run (PyTorch) or an exported model (.onnx). Folders are "
                    "searched recursively. Unreadable files are skipped and listed on stderr. "
                    "Exit status: 0; 1 with --fail-on-anomaly when an image is anomalous; 2 when "
                    "a file was skipped or the input is bad.")
    s.add_argument("run_dir", metavar="MODEL", help="a run folder or an exported .onnx file")
    s.add_argument("images", nargs="+", metavar="PATH", help="image files and folders")
    s.add_argument("--onnx", help="score with this export of the run (onnxruntime) instead of "
                                  "PyTorch; it must hold the run's weights")
    s.add_argument("--csv", help="also write path, score, verdict and each scale's score here")
    s.add_argument("--overlays", help="folder to save heat-map overlays into")
    s.add_argument("--fail-on-anomaly", action="store_true",
                   help="exit with status 1 when any image is anomalous")

    x = sub.add_parser("export", help="RUN_DIR as one ONNX model, checked against PyTorch")
    x.add_argument("run_dir")
    x.add_argument("--out", required=True, help="the .onnx file to write")
    x.add_argument("--images", help="check on the images of this folder (default: the run's "
                                    "test images)")
    x.add_argument("--check", type=int, default=256,
                   help="test images the check scores (0: all of them; default 256)")

    v = sub.add_parser("serve", help="an HTTP scoring service for a run or an exported model")
    v.add_argument("run_dir", metavar="MODEL", help="a run folder or an exported .onnx file")
    v.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: this machine only)")
    v.add_argument("--port", type=int, default=8000)
    return p


def cmd_datasets(args: argparse.Namespace) -> int:
    from core.data import DATASETS, DataError, list_classes

    for name, info in DATASETS.items():
        if info.needs_root and not args.data_root:
            print(f"{name:9s} {info.description}  (needs --data-root)")
            continue
        try:
            classes = list_classes(name, args.data_root if info.needs_root else None)
            print(f"{name:9s} {info.description}\n          classes: {', '.join(classes)}")
        except DataError as err:
            print(f"{name:9s} {info.description}  ({err})")
    return 0


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    data = DataConfig(
        dataset=args.dataset, root=args.data_root, normal_class=args.normal_class,
        setting=args.setting, anomaly_ratio=args.anomaly_ratio,
        anomaly_classes=tuple(c for c in args.anomaly_classes.split(",") if c),
        image_size=args.image_size, max_train=args.max_train, seed=args.seed,
    )
    shift = [] if args.shift_fraction is None else [
        f"train.shift_fraction={json.dumps(args.shift_fraction)}"]
    return run_config(args.preset, data, epochs=args.epochs, minutes=args.max_minutes,
                      seed=args.seed, device=args.device, overrides=[*shift, *args.set])


class StopOnSignal:
    """SIGINT/SIGTERM ask training to stop after the current step (a checkpoint is written);
    a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nanomem: {signal.Signals(signum).name}: stopping after this step and writing "
              "a checkpoint (Ctrl-C again to quit at once)", file=sys.stderr)

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from core.pipeline import resume_run, train_run
    from core.runs import CONFIG, WEIGHTS
    from core.train.distributed import Dist

    if args.resume and args.out:
        raise CliError("--resume continues a run in its own folder: leave out --out")
    if not args.resume and not args.out:
        raise CliError("--out is required (the run folder to create), or --resume RUN_DIR")
    if args.resume:
        out = Path(args.resume)
        if not out.is_dir():
            raise CliError(f"--resume {out}: no such run folder")
    else:
        cfg = _config_from_args(args)
        out = Path(args.out)
        if (out / WEIGHTS).exists() or (out / CONFIG).exists():
            raise CliError(f"--out {out}: already holds a run (choose a new folder)")

    dist = Dist.from_env(args.device)
    dist.barrier()  # every rank has checked --out before rank 0 writes into it
    stop = StopOnSignal()
    stop.install()
    bars: dict[str, tqdm] = {}

    def progress(p) -> None:
        if not dist.is_main:
            return
        bar = bars.get(p.stage)
        if bar is None:
            bar = bars[p.stage] = tqdm(total=1000, desc=p.stage, unit="‰", leave=True,
                                       bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                                                  "{elapsed}{postfix}")
        bar.n = int(1000 * p.done)
        bar.set_postfix_str(p.message, refresh=False)
        bar.refresh()

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            if args.resume:
                metrics = resume_run(out, progress, stop, dist, explore=args.explore)
            else:
                metrics = train_run(cfg, out, progress, stop, dist=dist, explore=args.explore)
    finally:
        for bar in bars.values():
            bar.close()
        dist.close()
    if dist.is_main:
        print(_summary(metrics))
        print(f"run saved in {out}")
    return 0


def _summary(m: dict) -> str:
    def f(v) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    parts = [f"AUROC {f(m.get('auroc'))}"]
    parts += [f"{t} {f(v)}" for t, v in (m.get("auroc_by_type") or {}).items()]
    parts.append(f"pixel AUROC {f(m.get('pixel_auroc'))}")
    if "train_seconds" in m:
        parts.append(f"trained in {m['train_seconds']:.0f} s")
    return " | ".join(parts)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from core.pipeline import evaluate_run

    print(_summary(evaluate_run(Path(args.run_dir), args.device)))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from core.bench.runners import bench
    from core.bench.suites import BenchOptions

    suites = tuple(x.strip() for x in args.suites.split(",") if x.strip())
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        raise CliError(f"--suites: unknown {', '.join(unknown)} (expected {', '.join(SUITES)})")
    try:
        ratios = tuple(float(x) for x in args.ratios.split(",") if x.strip())
    except ValueError:
        raise CliError(f"--ratios {args.ratios!r}: expected numbers like 0.01,0.05") from None
    if not ratios or not all(0 < r <= 1 for r in ratios):
        raise CliError(f"--ratios {args.ratios!r}: expected numbers in (0, 1]")
    if args.minutes <= 0:
        raise CliError(f"--minutes {args.minutes}: expected a positive budget")
    root = Path(args.data_root) if args.data_root else None
    if root is not None and not root.is_dir():
        raise CliError(f"--data-root {root}: not a folder")
    for path in args.path:
        if not Path(path).is_dir():
            raise CliError(f"--path {path}: not a folder")
    opts = BenchOptions(
        out=Path(args.out), minutes=args.minutes, suites=suites, data_root=root,
        paths=tuple(Path(p) for p in args.path),
        classes=tuple(c for c in args.classes.split(",") if c),
        unbalanced_class=args.unbalanced_class, anomaly_class=args.anomaly_class,
        ratios=ratios, per_set=args.per_set, deep_peer=not args.no_deep_peer,
        feature_peers=not args.no_feature_peers, seed=args.seed,
        device=args.device, overrides=tuple(args.set), preset=args.preset)
    # a bad setting fails now, not per cell
    run_config(opts.preset, minutes=opts.minutes, seed=opts.seed, device=opts.device,
               overrides=opts.overrides)
    if args.per_set < 1:
        raise CliError(f"--per-set {args.per_set}: expected at least 1 class")

    def say(line: str) -> None:
        print(line, flush=True)

    bench(opts, say)
    print(f"results in {opts.out / 'results.csv'} and {opts.out / 'results.md'}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from core.inference import Detector
    from core.scoring_files import score_files

    detector = Detector.load(args.run_dir)
    if args.onnx:
        exported = Detector.load(args.onnx)
        if exported.info.weights_sha256 != detector.info.weights_sha256:
            raise CliError(f"--onnx {args.onnx}: not an export of {args.run_dir} (its weights "
                           "differ; export it again with anomem export)")
        detector = exported
    return score_files(detector, [Path(p) for p in args.images],
                       csv=Path(args.csv) if args.csv else None,
                       overlays=Path(args.overlays) if args.overlays else None,
                       fail_on_anomaly=args.fail_on_anomaly)


def cmd_export(args: argparse.Namespace) -> int:
    from core.export import ExportError, export_run

    images = None
    if args.images:
        from core.scoring_files import find_images

        folder = Path(args.images)
        if not folder.is_dir():
            raise CliError(f"--images {folder}: not a folder")
        import numpy as np
        import torch

        from core.data.imageio import read_image
        from core.runs import read_config

        model = read_config(Path(args.run_dir)).model
        arrays = [read_image(p, model.shape, model.in_channels)
                  for p in find_images([folder])[0]]
        if not arrays:
            raise CliError(f"--images {folder}: no image files in it")
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if args.check < 0:
        raise CliError(f"--check {args.check}: expected a number of images, or 0 for all")
    try:
        report = export_run(Path(args.run_dir), Path(args.out), images=images,
                            sample=args.check or None,
                            say=lambda m: print(f"anomem: {m}", file=sys.stderr))
    except ExportError as err:
        raise CliError(str(err)) from None
    print(report.summary())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from core.serve import serve

    if not 0 < args.port < 65536:
        raise CliError(f"--port {args.port}: expected 1..65535")
    serve(args.run_dir, host=args.host, port=args.port)
    return 0


def cmd_refit(args: argparse.Namespace) -> int:
    from core.data.base import NORMAL
    from core.refit import lesson_story, mark_file, refit_run
    from core.runs import read_config

    cfg = read_config(Path(args.run_dir))
    marks = [mark_file(Path(f), NORMAL, cfg) for f in args.normal]
    for item in args.anomaly:
        kind, sep, name = item.partition("=")
        if not sep or not kind or not name:
            raise CliError(f"--anomaly {item!r}: expected TYPE=FILE")
        if kind == NORMAL:
            raise CliError(f"--anomaly {item!r}: 'normal' is not an anomaly type (use --normal)")
        marks.append(mark_file(Path(name), kind, cfg))
    report = refit_run(Path(args.run_dir), marks, Path(args.out), args.device)
    before, after = report.before, report.after
    print(f"taught in {report.seconds:.1f} s: {report.n_normal_marks} normal and "
          f"{report.n_anomaly_marks} anomaly marks; new run {args.out} (everything else "
          "the parent fitted is kept)")
    print(f"test AUROC {before['auroc']:.4f} -> {after['auroc']:.4f}; false-positive rate at "
          f"the threshold {before['fpr_at_threshold']:.1%} -> {after['fpr_at_threshold']:.1%}")
    for kind, value in after["auroc_by_type"].items():
        print(f"  {kind}: {before['auroc_by_type'][kind]:.4f} -> {value:.4f}")
    print(f"{len(report.changed)} unmarked test images changed verdict")
    if report.lessons:
        print(lesson_story(report.lessons))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from core.report import write_report
    from core.runs import load_run

    out = Path(args.out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise CliError(f"--out {args.out!r}: expected an .html file")
    run = load_run(Path(args.run_dir), args.device)
    html_path, csv_path = write_report(run, out, args.device)
    print(f"report written: {html_path} (per-image scores: {csv_path})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"datasets": cmd_datasets, "train": cmd_train, "evaluate": cmd_evaluate,
                "score": cmd_score, "bench": cmd_bench, "refit": cmd_refit,
                "report": cmd_report, "export": cmd_export, "serve": cmd_serve}
    from core.data.base import DataError
    from core.runs import RunError
    from core.train.trainer import TrainingCancelled

    try:
        return commands[args.command](args)
    except (CliError, ConfigError, DataError, RunError) as err:
        print(f"anomem: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingCancelled as stopped:
        if stopped.checkpoint_dir is not None:
            print(f"anomem: training stopped; checkpoint saved, continue with: "
                  f"anomem train --resume {stopped.checkpoint_dir}", file=sys.stderr)
        else:
            print("anomem: training stopped", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("anomem: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
