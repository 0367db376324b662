"""Training: ``segapp train`` on top of a bundle's train config, atomic checkpoints with exact resume,
MLflow tracking, per-epoch reseeding, device-side batch augmentation, progress, and the run folder that
is itself a bundle."""
