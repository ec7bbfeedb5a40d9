"""Score images: upload files, get a score, a verdict, the maps and the nearest prototypes."""

from __future__ import annotations

import streamlit as st

from app import widgets
from core.data import imageio
from core.data.imageio import IMAGE_SUFFIXES

st.title("Score images")
run = widgets.require_run()
cfg = run.config.model

st.caption(
    f"Each file is checked (image type, at most {imageio.MAX_UPLOAD_BYTES // 2**20} MB and "
    f"{imageio.MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels), resized to the run's "
    f"{cfg.shape[1]}×{cfg.shape[0]} px (width × height) and scored against threshold "
    f"{float(run.model.detector.threshold):.3f}."
)
# No `type=` filter: Streamlit's own check raises for the whole widget on one wrong suffix;
# imageio.validate_upload refuses that file alone, with its name and the accepted types.
files = st.file_uploader(f"Images ({', '.join(sorted(s.lstrip('.') for s in IMAGE_SUFFIXES))})",
                         accept_multiple_files=True, key="score_files")
if not files:
    st.info("Upload one or more images to score them.")
else:
    widgets.colour_legend(run)
    for f in files:
        widgets.show_upload(run, f.name, f.getvalue())
