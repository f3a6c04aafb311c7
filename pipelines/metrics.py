"""Classification metrics from predictions: one copy for evaluate, gate and the report."""
from __future__ import annotations

import numpy as np


def classification(y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...]) -> dict:
    """Accuracy, per-class precision/recall/support and the confusion matrix
    (`confusion[i][j]` = true class i predicted as j)."""
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion)
    support = confusion.sum(1)
    predicted = confusion.sum(0)
    per_class = {
        c: {"precision": float(tp[i] / predicted[i]) if predicted[i] else 0.0,
            "recall": float(tp[i] / support[i]) if support[i] else 0.0,
            "support": int(support[i])}
        for i, c in enumerate(classes)}
    return {"accuracy": float(tp.sum() / max(len(y_true), 1)), "n": int(len(y_true)),
            "per_class": per_class, "confusion": confusion.tolist()}
