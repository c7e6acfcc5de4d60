"""Self-play: the questions and answer pairs a model generates about unlabelled images, and how judged
rows become preference pairs. Builds on ``stmed.model``, ``stmed.data`` and ``stmed.judge``."""
