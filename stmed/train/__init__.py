"""Training: the stage-1 loop, DPO, their losses, checkpoints and sessions, cross-worker reduction, and
the tiny preset's general-alignment warm-up. Builds on ``stmed.model`` and ``stmed.data``."""
