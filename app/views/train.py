"""Train: choose data and a few hyper-parameters, train in the background, watch the curves."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app import charts, jobs, state, train_form
from core.config import SETTINGS, ConfigError, RunConfig
from core.data import DATASETS, DataError, anomaly_choices, list_classes
from core.presets import PRESETS, preset
from core.runs import STOPPED, TRAINING, RunError, delete_run, read_history
from core.train.checkpoint import read_checkpoint

POLL_SECONDS = 2.0

board = state.job_board()
has_runs = any(state.selectable(s) for s in state.saved_runs())
if "train_watching" not in st.session_state:
    st.session_state.train_watching = None


def start(cfg: RunConfig, name: str) -> None:
    try:
        job = board.start(cfg, state.runs_root(), name)
    except (RuntimeError, RunError, OSError) as err:
        st.error(f"Cannot start training: {err}")
        return
    st.session_state.train_watching = str(job.out)
    st.rerun()


def progress_panel() -> None:
    """Progress, live curves and a cancel button; reruns the whole app when the job ends."""
    job = board.current
    snap = job.snapshot()
    if snap.running:
        st.progress(snap.fraction, text=f"**{snap.name}** · {snap.message} · "
                                        f"{snap.seconds:.0f} s")
        if st.button("Stop training", key="train_cancel", icon=":material/stop:",
                     help="Stops after the current step and keeps a checkpoint to resume from"):
            job.cancel()
            st.toast("Stopping after the current step…")
    elif st.session_state.train_watching == str(snap.path):
        st.session_state.train_watching = None
        st.rerun()  # let the sidebar pick up the finished run
    elif snap.status == jobs.JobStatus.DONE:
        auroc = (snap.metrics or {}).get("auroc")
        score = "n/a" if auroc is None else f"{auroc:.3f}"
        st.success(f"Run **{snap.name}** finished in {snap.seconds:.0f} s (test AUROC "
                   f"{score}). It is selected in the sidebar: open any page to explore it.")
    elif snap.status == jobs.JobStatus.FAILED:
        st.error(f"Training of **{snap.name}** failed: {snap.error}")
    elif snap.status == jobs.JobStatus.STOPPED:
        st.warning(f"Training of **{snap.name}** was stopped; its checkpoint is kept: resume "
                   "it under *Stopped runs* below.")
    elif snap.status == jobs.JobStatus.CANCELLED:
        st.warning(f"Training of **{snap.name}** was cancelled; nothing was saved.")
    for note in snap.notes:
        st.warning(note)
    if snap.rows:
        left, right = st.columns(2)
        left.plotly_chart(charts.loss_curves(snap.rows), key="train_loss_chart")
        right.plotly_chart(charts.usage_curves(snap.rows), key="train_usage_chart")
    elif snap.running:
        st.caption("Curves appear when the first epoch ends.")


def resume(path: Path) -> None:
    try:
        job = board.resume(path)
    except (RuntimeError, RunError, OSError) as err:
        st.error(f"Cannot resume: {err}")
        return
    st.session_state.train_watching = str(job.out)
    st.rerun()


def unfinished_runs_panel(own: Path | None) -> None:
    """Runs that have not finished: those another process is training (their progress, no
    buttons) and stopped ones (resume or delete). Buttons are keyed by the run's folder, so
    a list that reorders while runs train never moves a click onto another run."""
    summaries = state.saved_runs()
    elsewhere = [s for s in summaries if s.state == TRAINING and s.path != own]
    stopped = [s for s in summaries if s.state == STOPPED]
    if elsewhere:
        with st.expander(f"Training in another process ({len(elsewhere)})", expanded=True):
            st.caption("A CLI or another app holds these runs; they open here once finished.")
            for s in elsewhere:
                st.write(f"**{s.name}** · {history_line(s.path)}")
    if not stopped:
        return
    with st.expander(f"Stopped runs ({len(stopped)})", expanded=True):
        st.caption("Each keeps the checkpoint of its last step or epoch; resuming continues "
                   "with the run's own settings.")
        for s in stopped:
            try:
                _, ckpt = read_checkpoint(s.path)
                where = f"epoch {ckpt.epoch}, step {ckpt.step}, {ckpt.elapsed_s:.0f} s trained"
            except RunError as err:
                st.error(str(err))
                continue
            left, mid, right = st.columns([4, 1, 1])
            left.write(f"**{s.name}** · {where}")
            if mid.button("Resume", key=f"train_resume_{s.path}", icon=":material/play_arrow:",
                          disabled=running):
                resume(s.path)
            if right.button("Delete", key=f"train_delete_{s.path}", icon=":material/delete:"):
                try:  # takes the run's lock and checks again: never a run someone is training
                    delete_run(s.path)
                except RunError as err:
                    st.error(f"Not deleted: {err}")
                else:
                    st.rerun()


def history_line(path: Path) -> str:
    """Epochs done and the last loss, from the run's history.jsonl."""
    try:
        rows = read_history(path)
    except (RunError, OSError):
        return "progress unreadable"
    if not rows:
        return "loading data or in its first epoch"
    loss = rows[-1].get("loss")
    return f"{len(rows)} epochs" + (f", loss {loss:.3f}" if isinstance(loss, float) else "")


st.title("Train")
job = board.current
running = job is not None and job.running

if not has_runs and not running:
    with st.container(border=True):
        st.subheader("No saved run yet")
        st.write(
            "Start with the **quick** preset on the built-in **shapes** data (generated, "
            f"nothing to download): it trains for about {jobs.FIRST_RUN_MINUTES:.0f} minutes on a "
            "CPU, then every page of the explorer opens it."
        )
        if st.button("Train the quick preset on shapes", type="primary",
                     key="train_first_run", icon=":material/play_arrow:"):
            start(train_form.first_run_config(), "shapes-quick")

if job is not None:
    st.fragment(progress_panel, run_every=POLL_SECONDS if running else None)()
unfinished_runs_panel(job.out if running else None)

with st.expander("Configure a run", expanded=has_runs and not running):
    dataset = st.selectbox("Data set", list(DATASETS), key="train_dataset",
                           format_func=lambda n: f"{n} — {DATASETS[n].description}")
    info = DATASETS[dataset]
    root = None
    if info.needs_root:
        root = st.text_input("Data folder on this machine", key=f"train_root_{dataset}",
                             placeholder="/path/to/data").strip() or None
    classes: list[str] = []
    if info.needs_root and root is None:
        st.info(f"Enter the folder of the data: {info.description}.")
    else:
        try:
            classes = list_classes(dataset, root)
        except DataError as err:
            st.error(str(err))
    normal = None
    anomaly_classes: list[str] = []
    ratio = 0.05
    if classes:
        normal = st.selectbox("Normal class", classes, key=f"train_normal_{dataset}")
        setting = st.radio("Setting", SETTINGS, key="train_setting", horizontal=True,
                           captions=["normal images only", "plus a few labelled anomalies"])
        if setting == "unbalanced":
            ratio = st.number_input("Labelled anomalies per normal training image", 0.01, 1.0,
                                    0.05, 0.01, key="train_ratio")
            anomaly_classes = st.multiselect(
                "Anomaly classes or types to label (none: all)",
                anomaly_choices(dataset, root, normal),
                key=f"train_anomaly_classes_{dataset}")
    else:
        setting = "one-class"

    cols = st.columns(3)
    preset_name = cols[0].selectbox(
        "Preset", PRESETS, key="train_preset",
        help="quick: memories on a frozen ImageNet-pretrained EfficientNet-Lite0, minutes on a "
             "CPU · scratch: a small ResNet trained from scratch, as the paper does, minutes "
             "on a CPU · paper: ResNet-18 from scratch, GPU")
    defaults = preset(preset_name)
    epochs = cols[1].number_input("Epochs", 1, 10_000, defaults.train.epochs,
                                  key=f"train_epochs_{preset_name}")
    minutes = cols[2].number_input("Max minutes (0: no limit)", 0.0, 10_000.0, 0.0, 1.0,
                                   key="train_minutes")
    memory = cols[0].number_input("Prototypes per scale", 2, 4096, defaults.model.memory_size,
                                  key=f"train_memory_{preset_name}")
    seed = cols[1].number_input("Seed", 0, 2**31 - 1, 0, key="train_seed")
    max_train = cols[2].number_input("Max normal training images (0: all)", 0, 10_000_000, 0,
                                     key="train_max_train")
    default_name = f"{dataset}-{normal or 'run'}-{preset_name}"
    name = st.text_input("Run name", key="train_name", placeholder=default_name).strip()

    if st.button("Start training", type="primary", key="train_start",
                 disabled=running or not classes, icon=":material/play_arrow:"):
        try:
            cfg = train_form.make_config(
                dataset=dataset, root=root, normal_class=normal, setting=setting,
                anomaly_ratio=float(ratio), anomaly_classes=tuple(anomaly_classes),
                preset_name=preset_name, epochs=int(epochs), max_minutes=float(minutes),
                memory_size=int(memory), seed=int(seed), max_train=int(max_train))
        except ConfigError as err:
            st.error(f"Invalid settings: {err}")
        else:
            start(cfg, name or default_name)
    if running:
        st.caption("One run trains at a time: cancel or wait for the current one.")
