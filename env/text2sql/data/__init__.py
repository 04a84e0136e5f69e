"""Data for the text-to-SQL environment: a synthetic generator, loaders for public formats, and
model-like predictions with known outcomes for benchmarks and demos."""

from __future__ import annotations

from .generator import DOMAINS, TEMPLATE_KINDS, GenerationReport, generate, generate_with_report
from .loaders import from_gretel_rows, load, load_hf, load_jsonl, load_parquet, load_spider
from .perturb import MIX, PREDICTION_KINDS, Prediction, perturb, perturbed_predictions

__all__ = [
    "DOMAINS", "MIX", "PREDICTION_KINDS", "GenerationReport", "Prediction", "TEMPLATE_KINDS", "from_gretel_rows", "generate",
    "generate_with_report", "load",
    "load_hf", "load_jsonl", "load_parquet", "load_spider", "perturb", "perturbed_predictions",
]
