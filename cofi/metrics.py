"""GLUE metrics, computed with scikit-learn and scipy."""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

MetricFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]


def accuracy(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"accuracy": float(accuracy_score(labels, preds))}


def accuracy_and_f1(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"accuracy": float(accuracy_score(labels, preds)), "f1": float(f1_score(labels, preds))}


def matthews(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"matthews": float(matthews_corrcoef(labels, preds))}


def pearson_and_spearman(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {
        "pearson": float(pearsonr(preds, labels)[0]),
        "spearman": float(spearmanr(preds, labels)[0]),
    }


METRICS: dict[str, MetricFn] = {
    "accuracy": accuracy,
    "accuracy_f1": accuracy_and_f1,
    "matthews": matthews,
    "pearson_spearman": pearson_and_spearman,
}
