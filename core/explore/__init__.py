"""What the explorer shows, computed: prototype galleries, UMAP, overlays, edge cases, type stats.

Plain functions over a trained `AnoMem` and uint8 images, so the app's pages stay thin and the
CLI can call the same code. One module per concern:

- `images`: tensors (C, H, W) or (N, C, H, W), as in `ImageSet`, to numpy arrays (H, W, C) or
  (H, W), as images are displayed;
- `prototypes`: each prototype's top training patches, shown as receptive-field crops;
- `embedding`: pooled queries and prototypes in one 2-D UMAP;
- `maps`: deviation maps, their overlays on one fixed colour scale, one image's report;
- `stats`: scores by sample and by anomaly type (edge cases, per-type tables, ROC curves);
- `runs`: two runs side by side (config differences, metrics, images they disagree on).

Every name is also importable from `core.explore` itself, as the app does.
"""

from __future__ import annotations

from core.explore.embedding import (  # noqa: F401
    EDGE_CASE,
    PCA_BELOW,
    UMAP_EPOCHS,
    UmapPoints,
    embed_images,
    exact_knn,
    sample_groups,
    umap_embedding,
    umap_points,
)
from core.explore.images import (  # noqa: F401
    draw_box,
    hwc_to_chw,
    subsample,
    to_rgb,
    upscale,
)
from core.explore.maps import (  # noqa: F401
    DEFAULT_CMAP,
    ImageReport,
    Match,
    Nearest,
    colour_bar,
    colour_table,
    colourise,
    combined_maps,
    combined_scales,
    deviation_maps,
    heat_range,
    inspect_image,
    match_position,
    overlay,
)
from core.explore.prototypes import (  # noqa: F401
    DUPLICATE_COSINE,
    MIN_CROP,
    RF_STRIDES,
    PatchHit,
    PrototypePatches,
    crop,
    crop_window,
    describe_scale,
    near_duplicates,
    patch_strip,
    top_patches,
)
from core.explore.runs import (  # noqa: F401
    config_diff,
    disagreements,
    flat_config,
    metrics_side_by_side,
    standing,
)
from core.explore.stats import (  # noqa: F401
    TypeRoc,
    TypeStats,
    check_table,
    display_cap,
    edge_cases,
    median_scale_profile,
    roc_by_type,
    spread_examples,
    term_table,
    type_order,
    type_stats,
    weighing_summary,
)
