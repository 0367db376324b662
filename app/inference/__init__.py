"""Inference: the predictor (a bundle's network, preprocessing, inferer and postprocessing; fused fast path
or MONAI's plain path), bounded sliding-window stitching, resampling to the source grid, what to segment
and where its outputs go (jobs), the per-series pipeline that writes outputs and returns a typed result,
and batch inference over many series."""
