"""core/train/checkpoint.py with the stage-1 loop: stop anywhere, resume, get the same model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from core.config import ModelConfig, TrainConfig
from core.model.anomem import AnoMem
from core.runs import RunError
from core.train.checkpoint import CHECKPOINT, read_checkpoint
from core.train.stage1 import train_stage1
from core.train.trainer import TrainingCancelled

CPU = torch.device("cpu")


def data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8, generator=g)


def fresh_model(make_model_config: Callable[..., ModelConfig], seed: int,
                pretrained: bool = False) -> AnoMem:
    torch.manual_seed(seed)
    if pretrained:  # the frozen encoder: stage 1 learns on its cached features
        return AnoMem(make_model_config(image_size=16, input_size=32, memory_size=6,
                                        backbone="efficientnet-lite0",
                                        scales=("stage3_s8", "stage5_s16")))
    return AnoMem(make_model_config(image_size=16, scales=("layer2", "layer3")))


def stop_after(n: int) -> Callable[[], bool]:
    calls = iter(range(10**6))
    return lambda: next(calls) >= n - 1


TC = TrainConfig(epochs=3, batch_size=8)  # 3 steps per epoch, 9 in all


def test_checkpoint_after_every_epoch_holds_the_epochs_done(
        make_model_config: Callable[..., ModelConfig], tmp_path: Path) -> None:
    model = fresh_model(make_model_config, 0)
    history, _ = train_stage1(model, data(), torch.empty(0, 3, 16, 16, dtype=torch.uint8), TC,
                              CPU, run_dir=tmp_path)
    _, state = read_checkpoint(tmp_path)
    assert state.epoch == 3 and state.step == 9 and state.finished and state.perm is None
    assert [r["loss"] for r in state.history] == [r["loss"] for r in history]
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


@pytest.mark.parametrize(("stop_at", "pretrained"), [
    (2, False), (3, False), (7, False),  # mid-epoch, at an epoch's end, mid-epoch
    (2, True), (3, True)])  # the frozen encoder's cache is made again, the same
def test_stopped_and_resumed_training_matches_an_uninterrupted_one(
        make_model_config: Callable[..., ModelConfig], tmp_path: Path, stop_at: int,
        pretrained: bool) -> None:
    empty = torch.empty(0, 3, 16, 16, dtype=torch.uint8)
    straight = fresh_model(make_model_config, 0, pretrained)
    expected, _ = train_stage1(straight, data(), empty, TC, CPU)

    first = fresh_model(make_model_config, 0, pretrained)
    with pytest.raises(TrainingCancelled) as stopped:
        train_stage1(first, data(), empty, TC, CPU, run_dir=tmp_path,
                     should_stop=stop_after(stop_at))
    assert stopped.value.checkpoint_dir == tmp_path
    _, state = read_checkpoint(tmp_path)
    assert state.step == stop_at and not state.finished

    # Another process would start from other random weights: the checkpoint must replace them.
    torch.manual_seed(123)
    resumed = fresh_model(make_model_config, 99, pretrained)
    history, _ = train_stage1(resumed, data(), empty, TC, CPU, run_dir=tmp_path, resume=True)
    assert [r["loss"] for r in history] == pytest.approx([r["loss"] for r in expected])
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k


def test_a_damaged_checkpoint_is_refused(make_model_config: Callable[..., ModelConfig],
                                         tmp_path: Path) -> None:
    model = fresh_model(make_model_config, 0)
    empty = torch.empty(0, 3, 16, 16, dtype=torch.uint8)
    tc = TrainConfig(epochs=1, batch_size=8)
    train_stage1(model, data(), empty, tc, CPU, run_dir=tmp_path)
    file = tmp_path / CHECKPOINT
    raw = file.read_bytes()

    file.write_bytes(raw[: len(raw) // 2])  # a half-copied file
    with pytest.raises(RunError, match="not a readable checkpoint"):
        read_checkpoint(tmp_path)

    flipped = bytearray(raw)
    flipped[-100] ^= 0xFF  # one bit pattern changed inside the tensor data
    file.write_bytes(bytes(flipped))
    with pytest.raises(RunError, match="checksum mismatch"):
        train_stage1(fresh_model(make_model_config, 0), data(), empty, tc, CPU,
                     run_dir=tmp_path, resume=True)
    assert file.read_bytes() == bytes(flipped)  # refused without being rewritten

    file.unlink()
    with pytest.raises(RunError, match="no checkpoint"):
        read_checkpoint(tmp_path)
