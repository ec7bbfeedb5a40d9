"""AnoMem Explorer: train a run, then see why an image is anomalous.

Start it from the repository root with `streamlit run app/main.py`. Runs are read from and
saved under $ANOMEM_RUNS (default ./runs). One file per page under app/views/.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run app/main.py` puts app/, not the repo, on the path
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import state, widgets  # noqa: E402

st.set_page_config(page_title="AnoMem Explorer", page_icon=":material/memory:", layout="wide")
state.init_session()

pages = [
    st.Page("views/train.py", title="Train", icon=":material/model_training:",
            url_path="train", default=True),
    st.Page("views/prototypes.py", title="Prototypes", icon=":material/grid_view:",
            url_path="prototypes"),
    st.Page("views/embedding.py", title="UMAP", icon=":material/scatter_plot:",
            url_path="umap"),
    st.Page("views/deviations.py", title="Deviation maps", icon=":material/layers:",
            url_path="deviation-maps"),
    st.Page("views/compare_types.py", title="Compare anomaly types", icon=":material/compare:",
            url_path="compare"),
    st.Page("views/score.py", title="Score images", icon=":material/upload:",
            url_path="score"),
    st.Page("views/teach.py", title="Teach", icon=":material/school:", url_path="teach"),
    st.Page("views/compare_runs.py", title="Compare runs", icon=":material/difference:",
            url_path="compare-runs"),
]
page = st.navigation(pages)
widgets.run_picker()  # after the pages are known: its link to Teach needs them
page.run()
