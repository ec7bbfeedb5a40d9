"""core/runs.py: safetensors + JSON run folders, atomic writes, and every way loading fails."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.config import CONFIG_VERSION, ModelConfig, RunConfig
from core.model.anomem import AnoMem
from core.runs import (
    CONFIG,
    METRICS,
    WEIGHTS,
    RunError,
    append_history,
    list_runs,
    load_model,
    load_run,
    new_run_dir,
    read_history,
    save_model,
    write_atomic,
    write_json,
)


@pytest.fixture
def run_config(tiny_cfg: ModelConfig) -> RunConfig:
    return RunConfig(model=tiny_cfg)


@pytest.fixture
def saved_run(tmp_path: Path, run_config: RunConfig) -> Path:
    torch.manual_seed(0)
    model = AnoMem(run_config.model)
    path = tmp_path / "run"
    save_model(path, run_config, model)
    return path


def perturbed_model(cfg: ModelConfig) -> AnoMem:
    """A model whose buffers (BN statistics, fitted detector) differ from a fresh one's."""
    torch.manual_seed(1)
    model = AnoMem(cfg)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                buf.add_(torch.rand_like(buf) * 0.5)
            elif "num_batches_tracked" in name:
                buf.fill_(7)
        model.detector.fitted.fill_(True)
    return model.eval()


def assert_same_model(model: AnoMem, loaded: AnoMem) -> None:
    """The same tensors under the same names, and the same scores and maps."""
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b), k
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model.score(images), loaded.score(images)
    assert torch.equal(a.image, b.image) and torch.equal(a.pixel_map, b.pixel_map)


def test_save_and_load_give_identical_outputs(tmp_path: Path, run_config: RunConfig) -> None:
    model = perturbed_model(run_config.model)
    save_model(tmp_path, run_config, model)
    loaded = load_model(tmp_path)
    assert not loaded.training
    assert_same_model(model, loaded)
    assert RunConfig.from_dict(json.loads((tmp_path / CONFIG).read_text())) == run_config


# today's tensor names -> those of weights saved before core/model/gaussians.py and terms.py
EARLIER_TERMS = {"terms.pixels.bank": "pixels.bank", "terms.pixels.count": "pixels.count",
                 "terms.pixel_layout.gaussian.mean": "pixel_layout.mean",
                 "terms.pixel_layout.gaussian.precision": "pixel_layout.precision",
                 "terms.pixels.loc": "detector.pixel_loc",
                 "terms.pixels.scale": "detector.pixel_scale",
                 "terms.pixel_layout.loc": "detector.pixel_layout_loc",
                 "terms.pixel_layout.scale": "detector.pixel_layout_scale"}
EARLIER_SCALE = {"local.mean": "mean", "local.precision": "precision",
                 "layout.mean": "layout_mean", "layout.basis": "layout_basis",
                 "layout.variances": "layout_var", "layout.noise": "layout_noise"}


def earlier_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        rest = ".".join(parts[3:])
        if parts[:2] == ["detector", "per_scale"] and rest in EARLIER_SCALE:
            key = ".".join([*parts[:3], EARLIER_SCALE[rest]])
        out[EARLIER_TERMS.get(key, key)] = value
    return out


def test_weights_saved_under_the_earlier_tensor_names_load_the_same(
        tmp_path: Path, run_config: RunConfig) -> None:
    model = perturbed_model(run_config.model)
    save_model(tmp_path, run_config, model)
    earlier = earlier_names(load_file(tmp_path / WEIGHTS))
    assert {"detector.per_scale.layer2.mean", "detector.per_scale.layer4.layout_var",
            "pixels.bank", "pixel_layout.precision", "detector.pixel_loc"} <= set(earlier)
    assert not any(k.startswith(("terms.", "detector.per_scale.layer3.local")) for k in earlier)
    save_file(earlier, tmp_path / WEIGHTS)
    loaded = load_model(tmp_path)
    assert_same_model(model, loaded)


def test_load_run_reads_metrics_and_history(saved_run: Path, run_config: RunConfig) -> None:
    write_json(saved_run / METRICS, {"auroc": 0.75})
    append_history(saved_run, {"epoch": 1, "loss": 2.0})
    append_history(saved_run, {"epoch": 2, "loss": 1.5})
    run = load_run(saved_run)
    assert run.config == run_config
    assert run.metrics == {"auroc": 0.75}
    assert run.history == [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}]


def test_write_atomic_replaces_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "file.json"
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.json"]


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    target = tmp_path / "metrics.json"
    write_atomic(target, "old")

    def broken_replace(src, dst) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_failed_weights_write_keeps_the_old_weights(
        saved_run: Path, run_config: RunConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    before = (saved_run / WEIGHTS).read_bytes()

    def broken_replace(src, dst) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        save_model(saved_run, run_config, perturbed_model(run_config.model))
    monkeypatch.undo()
    assert (saved_run / WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in saved_run.iterdir()) == [CONFIG, WEIGHTS]


def test_new_run_dir_never_returns_an_existing_folder(tmp_path: Path) -> None:
    made = [new_run_dir(tmp_path, "exp") for _ in range(3)]
    assert [p.name for p in made] == ["exp", "exp-2", "exp-3"]
    assert all(p.is_dir() and not any(p.iterdir()) for p in made)
    (tmp_path / "exp-4").mkdir()
    assert new_run_dir(tmp_path, "exp").name == "exp-5"


@pytest.mark.parametrize(("name", "expected"), [
    ("../../etc", "etc"),
    ("/abs/path", "abs-path"),
    ("..", "run"),
    ("", "run"),
    ("a b\\c", "a-b-c"),
])
def test_new_run_dir_sanitises_names(tmp_path: Path, name: str, expected: str) -> None:
    root = tmp_path / "runs"
    path = new_run_dir(root, name)
    assert path.name == expected
    assert path.resolve().parent == root.resolve()


def write_config(path: Path, text: str) -> None:
    (path / CONFIG).write_text(text)


def config_dict(saved_run: Path) -> dict:
    return json.loads((saved_run / CONFIG).read_text())


@pytest.mark.parametrize(("edit", "match"), [
    (lambda d: "{not json", "not valid JSON"),
    (lambda d: json.dumps([1, 2]), "JSON object"),
    (lambda d: json.dumps({**d, "version": CONFIG_VERSION + 1}), "version"),
    (lambda d: json.dumps({k: v for k, v in d.items() if k != "model"}),
     "missing or malformed section 'model'"),
    (lambda d: json.dumps({**d, "model": {**d["model"], "bogus": 1}}),
     "section 'model': unknown bogus"),
    (lambda d: json.dumps({**d, "data": {k: v for k, v in d["data"].items() if k != "seed"}}),
     "section 'data': missing seed"),
    (lambda d: json.dumps({**d, "model": {**d["model"], "width": 100}}), "width"),
])
def test_bad_config_json_raises_run_error_naming_the_file(saved_run: Path, edit, match: str
                                                          ) -> None:
    write_config(saved_run, edit(config_dict(saved_run)))
    with pytest.raises(RunError, match=match) as err:
        load_model(saved_run)
    assert str(saved_run / CONFIG) in str(err.value)


def test_missing_config_raises_run_error(saved_run: Path) -> None:
    (saved_run / CONFIG).unlink()
    with pytest.raises(RunError, match="missing"):
        load_run(saved_run)


def rewrite_weights(saved_run: Path, edit) -> None:
    state = load_file(saved_run / WEIGHTS)
    edit(state)
    save_file(state, saved_run / WEIGHTS)


def test_missing_tensor_raises_run_error(saved_run: Path) -> None:
    rewrite_weights(saved_run, lambda s: s.pop("memories.layer3.prototypes"))
    with pytest.raises(RunError, match="missing memories.layer3.prototypes") as err:
        load_model(saved_run)
    assert str(saved_run / WEIGHTS) in str(err.value)


def test_extra_tensor_raises_run_error(saved_run: Path) -> None:
    rewrite_weights(saved_run, lambda s: s.update({"memories.layer1.prototypes":
                                                   torch.zeros(8, 8)}))
    with pytest.raises(RunError, match="unexpected memories.layer1.prototypes") as err:
        load_model(saved_run)
    assert str(saved_run / WEIGHTS) in str(err.value)


@pytest.mark.parametrize("tensor", [torch.zeros(9, 8), torch.zeros(8, 8, dtype=torch.float64)])
def test_mismatched_tensor_raises_run_error(saved_run: Path, tensor: torch.Tensor) -> None:
    rewrite_weights(saved_run, lambda s: s.update({"memories.layer2.prototypes": tensor}))
    with pytest.raises(RunError, match="tensor memories.layer2.prototypes") as err:
        load_model(saved_run)
    assert str(saved_run / WEIGHTS) in str(err.value)


@pytest.mark.parametrize("content", [
    random.Random(0).randbytes(4096),
    b"",
    (5).to_bytes(8, "little") + b"{abcd",  # header that is not JSON
    (8).to_bytes(8, "little") + b'{"a": 1}',  # JSON that is not a tensor table
])
def test_unreadable_weights_raise_run_error(saved_run: Path, content: bytes) -> None:
    (saved_run / WEIGHTS).write_bytes(content)
    with pytest.raises(RunError, match="safetensors") as err:
        load_model(saved_run)
    assert str(saved_run / WEIGHTS) in str(err.value)


def test_missing_weights_raise_run_error(saved_run: Path) -> None:
    (saved_run / WEIGHTS).unlink()
    with pytest.raises(RunError, match="missing"):
        load_model(saved_run)


def test_bad_history_line_raises_run_error(saved_run: Path) -> None:
    append_history(saved_run, {"epoch": 1})
    with (saved_run / "history.jsonl").open("a") as f:
        f.write("{oops\n")
    with pytest.raises(RunError, match="line 2"):
        read_history(saved_run)


def test_list_runs_reports_broken_runs_instead_of_raising(tmp_path: Path,
                                                          run_config: RunConfig) -> None:
    good = tmp_path / "good"
    save_model(good, run_config, AnoMem(run_config.model))
    write_json(good / METRICS, {"auroc": 0.9})
    unfinished = tmp_path / "unfinished"
    save_model(unfinished, run_config, AnoMem(run_config.model))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG).write_text("{truncated")
    old = tmp_path / "old"
    old.mkdir()
    (old / CONFIG).write_text(json.dumps({**run_config.to_dict(), "version": 0}))
    (tmp_path / "not-a-run").mkdir()

    runs = {r.name: r for r in list_runs(tmp_path)}
    assert set(runs) == {"good", "unfinished", "broken", "old"}
    assert runs["good"].complete and runs["good"].auroc == 0.9 and runs["good"].error is None
    assert runs["good"].dataset == "shapes"
    assert not runs["unfinished"].complete and runs["unfinished"].error is None
    for name in ("broken", "old"):
        assert not runs[name].complete
        assert runs[name].error and str(tmp_path / name / CONFIG) in runs[name].error
    assert "not valid JSON" in runs["broken"].error
    assert "version" in runs["old"].error


def test_list_runs_reports_a_metrics_file_that_is_not_an_object(tmp_path: Path,
                                                                run_config: RunConfig) -> None:
    run = tmp_path / "odd"
    save_model(run, run_config, AnoMem(run_config.model))
    write_json(run / METRICS, [0.9])
    good = tmp_path / "good"
    save_model(good, run_config, AnoMem(run_config.model))
    write_json(good / METRICS, {"auroc": 0.8})
    runs = {r.name: r for r in list_runs(tmp_path)}
    assert set(runs) == {"odd", "good"}  # one odd file does not hide the other runs
    odd = runs["odd"]
    assert not odd.complete and odd.auroc is None
    assert odd.error and str(run / METRICS) in odd.error and "JSON object" in odd.error
    assert runs["good"].complete and runs["good"].error is None


def test_list_runs_of_a_missing_root_is_empty(tmp_path: Path) -> None:
    assert list_runs(tmp_path / "nowhere") == []


def _lock_from_another_process(folder: Path) -> str:
    code = ("import sys\nfrom core.runs import RunError, run_lock\ntry:\n"
            "    with run_lock(sys.argv[1]):\n        print('taken')\n"
            "except RunError as err:\n    print('refused:', err)")
    return subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[2]).stdout


def test_run_lock_refuses_another_process_and_is_released(tmp_path: Path) -> None:
    from core.runs import is_locked, lock_depth, run_lock

    folder = tmp_path / "run"
    with run_lock(folder):
        out = _lock_from_another_process(folder)
        assert out.startswith("refused:") and "another process is training this run" in out
        with run_lock(folder):  # this process may take it again (the app, then train_run)
            assert lock_depth(folder) == 2 and is_locked(folder)
        assert lock_depth(folder) == 1 and is_locked(folder)
    assert lock_depth(folder) == 0 and not is_locked(folder)
    assert _lock_from_another_process(folder).startswith("taken")  # released on exit


def test_run_states_and_delete_run(tmp_path: Path) -> None:
    from core.runs import CHECKPOINT, delete_run, run_lock, run_state

    stopped, finished, broken = (tmp_path / n for n in ("stopped", "finished", "broken"))
    for folder in (stopped, finished, broken):
        folder.mkdir()
        (folder / CONFIG).write_text("{}")
    (stopped / CHECKPOINT).write_bytes(b"x")
    (finished / WEIGHTS).write_bytes(b"x")
    (finished / METRICS).write_text("{}")
    assert [run_state(f) for f in (stopped, finished, broken)] == [
        "stopped", "finished", "broken"]
    with run_lock(stopped):
        assert run_state(stopped) == "training"
        with pytest.raises(RunError, match="training in this app"):
            delete_run(stopped)  # another holder in this process: refused
    assert stopped.is_dir()
    with pytest.raises(RunError, match="is finished"):
        delete_run(finished)
    delete_run(stopped)
    delete_run(broken)
    assert not stopped.exists() and not broken.exists() and finished.is_dir()
    with pytest.raises(RunError, match="no longer exists"):
        delete_run(broken)
    assert not broken.exists()  # a missing folder is not created again
