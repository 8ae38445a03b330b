"""Evaluation metrics for click prediction: ROC AUC and log loss."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of `scores` (logits or probabilities) against 0/1 `labels`."""
    if labels.numel() == 0 or labels.min() == labels.max():
        return float("nan")
    return float(binary_auroc(scores.float(), labels.long(), thresholds=None))


def logloss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy of `logits` against 0/1 `labels`."""
    return float(F.binary_cross_entropy_with_logits(logits.float(), labels.float()))


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """AUC, log loss, row count and mean label of a scored split."""
    return {
        "auc": auc(logits, labels),
        "logloss": logloss(logits, labels),
        "rows": int(labels.numel()),
        "ctr": float(labels.float().mean()) if labels.numel() else float("nan"),
    }
