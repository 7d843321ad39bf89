"""Evaluation of a federation: task quality and privacy leakage (exposure, MIA, extraction)."""

from fedllm.eval.exposure import exposure, exposure_skewnormal
from fedllm.eval.roc import attack_summary, roc_auc, tpr_at_fpr

__all__ = ["attack_summary", "exposure", "exposure_skewnormal", "roc_auc", "tpr_at_fpr"]
