"""Does Mean-Shifted Contrastive fine-tuning of the encoder's last stages beat keeping it frozen?

    python benchmarks/finetune_msc.py [--minutes 3] [--sets cifar10,mvtec_bottle,kolektorsdd]
        [--classes airplane,automobile,cat] [--tune stage7] [--optimizer sgd] [--lr 1e-5]
        [--views 2] [--max-train 2000] [--max-test N] [--seed 0] [--data-root DATA] [--out MD]

AnoMem's quick preset reads the ImageNet-pretrained EfficientNet-Lite0 frozen. MSC (Reiss &
Hoshen, "Mean-Shifted Contrastive Loss for Anomaly Detection", AAAI 2023) adapts such an encoder
to the normal class: contrastive learning on features less the normal centre, plus an angular
centre loss, at a low learning rate, then DN2's kNN on the adapted features. Here it gets a
wall-clock budget of CPU minutes. Per cell (one normal class of one data set):

1. Frozen: DN2's score, the mean cosine distance to the k = 2 nearest training images, of the
   pooled unit last-stage features, and of the pooled unit stride-8/16/32 stage ends
   concatenated (as the DN2 peer of core/bench/feature_peers.py).
2. MSC: the stages before the tuned ones run once, over `--views` augmented views of every
   training image (their outputs cached in float16); only the tuned stages then train, on the
   cached maps. The budget counts that caching and the training, not the scoring.
3. The same two kNN scores on the tuned features; AUROC on the test set, before and after.

Stage 7 alone (one MBConv block, 192 -> 1152 -> 320 channels) is tuned by default: on the 2-core
CPU a step of 64 image pairs at 128 px costs about 0.15 s there against 0.9 s for stages 6-7
(whose 5 x 5 depthwise convolutions are slow to back-propagate), so the minutes left after the
caching buy six times as many epochs, closer to the paper's 20. `--tune stage6-7` tunes all of
stride 32, nearer the paper's last two of four ResNet stages.

Departures from the paper: the encoder (EfficientNet-Lite0, not ResNet-152) and its input
(CIFAR's 32 px images upsampled to 128 px, as the quick preset; MVTec-layout sets read at
224 px, the shorter side where the loader keeps their aspect);
views drawn once and cached (the paper draws two new ones each epoch): each step pairs two of
the `--views` cached views of an image; the project's batched augmentations at the paper's
strengths (MoCo v2's crop 0.2-1, colour jitter 0.4 / hue 0.1, grayscale 0.2, flip), with jitter
on every view instead of 80 % and no Gaussian blur; both views go through the network in one
pass. As in the paper's code, BatchNorm keeps its ImageNet statistics (the network stays in
eval mode) while its scale and shift train, SGD runs at lr 1e-5 with weight decay 5e-5 and no
momentum, batch 64, temperature 0.25, and the centre is the normalised mean of the frozen unit
training features.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from core.bench.feature_peers import nearest
from core.config import AugmentConfig, DataConfig
from core.data import ImageSet, load_split
from core.files import write_atomic
from core.model.efficientnet import STAGES, EfficientNetLite0
from core.presets import PRETRAINED_ALIGNED_SIZE, PRETRAINED_INPUT
from core.train.augment import augment, to_float
from core.train.features import BATCH

HERE = Path(__file__).resolve().parent
# Table name -> (data set, folder under the data root, working image size; None: native)
SETS = {"cifar10": ("folder", "cifar10", None),
        "mvtec_bottle": ("mvtec", "mvtec_ad/bottle", PRETRAINED_ALIGNED_SIZE),
        "kolektorsdd": ("mvtec", "kolektorsdd", PRETRAINED_ALIGNED_SIZE)}
TUNE = {"stage7": ("stage7_s32",), "stage6-7": ("stage6_s32", "stage7_s32")}
POOLED = ("stage3_s8", "stage5_s16")  # frozen stage ends of the 3-stage vector, before the last
MSC_VIEWS = AugmentConfig(crop_scale=(0.2, 1.0), jitter=0.4, hue=0.1, grayscale_p=0.2)
TEMPERATURE, BATCH_SIZE, WEIGHT_DECAY, K = 0.25, 64, 5e-5, 2


def mean_shifted_contrastive(z1: torch.Tensor, z2: torch.Tensor, centre: torch.Tensor,
                             temperature: float = TEMPERATURE) -> torch.Tensor:
    """MSC loss: NT-Xent on unit features (B, D) of two views less the unit centre (D,),
    re-normalised; each view's positive is its image's other view, the 2B - 2 other views of
    the batch its negatives."""
    u = F.normalize(torch.cat([z1, z2]) - centre, dim=1)  # (2B, D)
    self_pairs = torch.eye(len(u), dtype=torch.bool)
    logits = (u @ u.T / temperature).masked_fill(self_pairs, float("-inf"))
    b = len(z1)
    return F.cross_entropy(logits, torch.cat([torch.arange(b, 2 * b), torch.arange(b)]))


def angular_centre(z1: torch.Tensor, z2: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Angular centre loss: squared distance of unit features to the unit centre (2 - 2 cos),
    averaged over the batch for each view and summed, as the paper's code."""
    return (z1 - centre).square().sum(1).mean() + (z2 - centre).square().sum(1).mean()


class Frozen(NamedTuple):
    """What the frozen stages give for one image set."""

    maps: torch.Tensor  # (N, C, h, w) float16: the input of the first tuned stage
    pooled: torch.Tensor  # (N, 40 + 112): pooled stride-8 and stride-16 stage ends, each unit


@torch.no_grad()
def encode(net: EfficientNetLite0, images: torch.Tensor, views: AugmentConfig | None = None,
           g: torch.Generator | None = None) -> Frozen:
    """uint8 (N, 3, H, W) -> the frozen stages' outputs, of the images or of one augmented view
    of each (`views`); the encoder resizes to its input size."""
    maps, pooled = [], []
    for start in range(0, len(images), BATCH):
        x = images[start:start + BATCH]
        x = augment(x, views, g) if views else to_float(x)
        out = net(x.contiguous(memory_format=torch.channels_last))
        maps.append(out[net.last].half())
        pooled.append(torch.cat([F.normalize(out[s].mean((2, 3)), dim=1) for s in POOLED], 1))
    return Frozen(torch.cat(maps), torch.cat(pooled))


def last_stage(head: nn.Module, maps: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) cached maps -> (N, 320) pooled unit last-stage features (batch by batch)."""
    with torch.no_grad():
        return torch.cat([
            F.normalize(head(m.float().contiguous(memory_format=torch.channels_last)).mean((2, 3)),
                        dim=1) for m in maps.split(256)])


def knn_auroc(bank: torch.Tensor, queries: torch.Tensor, labels: np.ndarray) -> float:
    """AUROC (%) of DN2's score: mean cosine distance of each query to its K nearest rows of
    the bank (unit rows: squared Euclidean distance / 2 = 1 - cos)."""
    dist, _ = nearest(F.normalize(queries, dim=1), F.normalize(bank, dim=1), K)
    return 100 * roc_auc_score(labels, dist.square().div(2).mean(1).numpy())


def aurocs(head: nn.Module, train: Frozen, test: Frozen, labels: np.ndarray
           ) -> tuple[float, float]:
    """kNN AUROC (%) on the last stage, and on the three stage ends concatenated."""
    bank, queries = last_stage(head, train.maps), last_stage(head, test.maps)
    three = knn_auroc(torch.cat([train.pooled, bank], 1), torch.cat([test.pooled, queries], 1),
                      labels)
    return knn_auroc(bank, queries, labels), three


class Tuning(NamedTuple):
    epochs: float  # training images seen / training images
    seconds: float  # caching the views and training
    caching: float  # seconds of it spent caching the views


def msc_finetune(net: EfficientNetLite0, head: nn.Module, normals: torch.Tensor,
                 centre: torch.Tensor, args: argparse.Namespace, g: torch.Generator) -> Tuning:
    """Train `head` (kept in eval mode: frozen BatchNorm statistics) with the MSC and angular
    centre losses on cached views of the normals until `args.minutes` have passed."""
    start, budget = time.perf_counter(), 60 * args.minutes
    views = torch.stack([encode(net, normals, MSC_VIEWS, g).maps for _ in range(args.views)])
    caching = time.perf_counter() - start
    params = list(head.requires_grad_(True).parameters())
    opt = (torch.optim.SGD(params, args.lr, weight_decay=WEIGHT_DECAY) if args.optimizer == "sgd"
           else torch.optim.Adam(params, args.lr, weight_decay=WEIGHT_DECAY))
    seen, n = 0, len(normals)
    while time.perf_counter() - start < budget:
        for idx in torch.randperm(n, generator=g).split(BATCH_SIZE):
            if len(idx) < 2:  # no negatives
                continue
            pair = torch.rand(len(idx), args.views, generator=g).argsort(1)[:, :2]  # (B, 2)
            x = torch.cat([views[pair[:, 0], idx], views[pair[:, 1], idx]]).float()
            x = x.contiguous(memory_format=torch.channels_last)  # 3x faster on the CPU
            z1, z2 = F.normalize(head(x).mean((2, 3)), dim=1).chunk(2)  # (B, 320) each
            loss = mean_shifted_contrastive(z1, z2, centre) + angular_centre(z1, z2, centre)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(idx)
            if time.perf_counter() - start >= budget:
                break
    head.requires_grad_(False)
    return Tuning(seen / n, time.perf_counter() - start, caching)


_TEST: dict[tuple, Frozen] = {}  # the last test set's frozen outputs: CIFAR classes share it


def run_cell(name: str, data: DataConfig, args: argparse.Namespace) -> str:
    """One cell, frozen then tuned; its Markdown table row."""
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    split = load_split(data)
    normals = split.train.images[split.train.labels == 0]
    test: ImageSet = split.test
    if args.max_test and len(test) > args.max_test:  # a seeded subset, for smoke runs
        test = test.subset(torch.randperm(len(test), generator=g)[:args.max_test].sort().values)
    input_size = max(PRETRAINED_INPUT, min(normals.shape[-2:]))  # the encoder's shorter side
    tuned = TUNE[args.tune]
    before = list(STAGES)[STAGES[tuned[0]][0] - 2]  # the stage feeding the first tuned one
    net = EfficientNetLite0(normals.shape[1], input_size, before).requires_grad_(False).eval()
    full = EfficientNetLite0(normals.shape[1], input_size, "stage7_s32")
    head = nn.Sequential(*(full.stages[s] for s in tuned)).requires_grad_(False).eval()

    train = encode(net, normals)
    key = (hashlib.sha256(test.images.numpy().tobytes()).hexdigest(), input_size, args.tune)
    if key not in _TEST:
        _TEST.clear()
        _TEST[key] = encode(net, test.images)
    labels = test.labels.numpy()
    frozen = aurocs(head, train, _TEST[key], labels)
    centre = F.normalize(last_stage(head, train.maps).mean(0), dim=0)
    tuning = msc_finetune(net, head, normals, centre, args, g)
    after = aurocs(head, train, _TEST[key], labels)
    print(f"{name}/{split.normal_class}: {len(normals)} training images, views cached in "
          f"{tuning.caching:.0f} s, {tuning.epochs:.1f} epochs in {tuning.seconds:.0f} s",
          file=sys.stderr)
    row = [name, split.normal_class, *(f"{a:.1f}" for a in (*frozen, *after)),
           f"{tuning.epochs:.1f}", f"{tuning.seconds:.0f}"]
    return "| " + " | ".join(row) + " |"


def cells(args: argparse.Namespace) -> list[tuple[str, DataConfig]]:
    """(table name, data config) of every cell asked for whose data is at hand."""
    out = []
    for name in args.sets.split(","):
        dataset, folder, size = SETS[name]
        root = args.data_root / folder
        if not root.is_dir():
            print(f"{name}: skipped, no folder {root}")
            continue
        classes = args.classes.split(",") if dataset == "folder" else [None]
        out += [(name, DataConfig(dataset=dataset, root=str(root), normal_class=c,
                                  image_size=size, max_train=args.max_train, seed=args.seed))
                for c in classes]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="MSC budget per cell")
    parser.add_argument("--sets", default=",".join(SETS), help=f"some of {', '.join(SETS)}")
    parser.add_argument("--classes", default="airplane,automobile,cat", help="CIFAR-10 normals")
    parser.add_argument("--tune", choices=TUNE, default="stage7")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--views", type=int, default=2, help="augmented views cached per image")
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--max-test", type=int, default=0, help="0: every test image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", type=Path, default=HERE.parents[1] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=HERE / "finetune-msc" / "results.md")
    args = parser.parse_args()
    unknown = set(args.sets.split(",")) - set(SETS)
    if unknown or args.views < 2 or args.minutes <= 0:
        parser.error(f"expected --sets among {', '.join(SETS)}, --views >= 2, --minutes > 0")

    command = shlex.join(["python", *sys.argv])
    lines = [
        "# MSC fine-tuning of the frozen encoder's last stages",
        "",
        f"`{command}` on {datetime.now():%Y-%m-%d %H:%M}. Image AUROC (%) of DN2's kNN (k = 2, "
        f"cosine) on EfficientNet-Lite0 before and after MSC tuning of {args.tune} "
        f"({args.optimizer}, lr {args.lr:g}, {args.minutes:g} min including the view caching).",
        "",
        "| data set | class | frozen kNN (last stage) | frozen kNN (3 stages) | MSC-tuned kNN "
        "(last stage) | MSC-tuned kNN (3 stages) | epochs | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for name, data in cells(args):
        lines.append(run_cell(name, data, args))
        print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
