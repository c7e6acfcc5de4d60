"""Evaluation: LLaVA-Med's scorer and its metrics, and the run report. Builds on ``stmed.data``."""
