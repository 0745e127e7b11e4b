"""How well a head does on labelled clips: UA (balanced accuracy: the mean of the per-label
recalls, what emotion papers call unweighted accuracy), WA (plain accuracy: weighted by how
many clips each label has), macro F1, the confusion matrix, and calibration: the expected
calibration error (ECE, 15 equal-width bins of the top label's score) before and after a
temperature fitted by minimising the negative log-likelihood. Numpy, scipy and scikit-learn;
the served head never imports this.
"""

from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15
# The temperature is searched within the range a head file accepts (headfile.py).
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the true labels at `temperature`."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    top = z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(log_norm - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T that minimises the NLL of softmax(logits / T) (searched on log T)."""
    from scipy.optimize import minimize_scalar

    if len(y) == 0:
        return 1.0
    found = minimize_scalar(lambda log_t: nll(logits, y, math.exp(log_t)), method="bounded",
                            bounds=(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)))
    return float(math.exp(found.x))


def ece(probabilities: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error: over equal-width bins of the top score, the
    clip-weighted mean gap between the mean top score and the accuracy."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if len(y) == 0:
        return 0.0
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 joins bin 0.
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(total / len(y))


def scores(y: np.ndarray, predicted: np.ndarray, labels: list[str]) -> dict:
    """UA, WA, macro F1 and the confusion matrix (rows: the true label; columns: the
    predicted one) of label indices into `labels`."""
    from sklearn.metrics import confusion_matrix, f1_score

    every = list(range(len(labels)))
    matrix = confusion_matrix(y, predicted, labels=every)
    # UA over the labels the clips have (sklearn's balanced_accuracy_score, without its
    # warning when a label is predicted that no clip has)
    recalls = [matrix[i, i] / matrix[i].sum() for i in every if matrix[i].sum()]
    return {"clips": len(y),
            "ua": float(np.mean(recalls)) if recalls else 0.0,
            "wa": float(np.mean(y == predicted)) if len(y) else 0.0,
            "macro_f1": float(f1_score(y, predicted, labels=every, average="macro",
                                       zero_division=0)),
            "confusion": {"labels": list(labels), "matrix": matrix.tolist()}}


def report(y: np.ndarray, logits: np.ndarray, labels: list[str], before: float = 1.0,
           after: float | None = None) -> dict:
    """`scores` of the argmax, with the ECE at temperature `before` and, when given, `after`."""
    found = scores(y, np.asarray(logits).argmax(axis=1), labels)
    found["ece_before"] = ece(softmax(logits, before), y)
    if after is not None:
        found["ece_after"] = ece(softmax(logits, after), y)
    return found


def table(metrics: dict) -> str:
    """The confusion matrix as aligned text (rows true, columns predicted)."""
    labels, matrix = metrics["confusion"]["labels"], metrics["confusion"]["matrix"]
    corner = "true \\ predicted"
    first = max(len(corner), *(len(label) for label in labels))
    width = max(6, *(len(label) for label in labels), *(len(str(v)) for r in matrix for v in r))
    lines = [corner.ljust(first) + " " + " ".join(name.rjust(width) for name in labels)]
    for label, row in zip(labels, matrix):
        lines.append(label.ljust(first) + " " + " ".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def line(name: str, metrics: dict) -> str:
    """One line: UA, WA, macro F1 and the ECE (before -> after, when fitted)."""
    text = (f"{name}: UA {metrics['ua']:.3f}  WA {metrics['wa']:.3f}  macro F1 "
            f"{metrics['macro_f1']:.3f}  ECE {metrics['ece_before']:.3f}")
    if "ece_after" in metrics:
        text += f" -> {metrics['ece_after']:.3f}"
    return text + f"  ({metrics['clips']} clips)"


def plot_confusion(metrics: dict, path: str, title: str) -> None:
    """A PNG of the confusion matrix, counts in the cells, rows normalised for the colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = metrics["confusion"]["labels"]
    matrix = np.asarray(metrics["confusion"]["matrix"], dtype=float)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(labels) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    for i in range(len(labels)):
        for j in range(len(labels)):
            axes.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                      color="white" if shares[i, j] > 0.5 else "black")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
