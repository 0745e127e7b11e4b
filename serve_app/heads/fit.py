"""Fitting a head on utterance embeddings with scikit-learn, cross-validating it, and turning
the fitted estimator into the head file's tensors (serve_app/heads/headfile.py):

- linear: StandardScaler + multinomial LogisticRegression, classes balanced;
- mlp: StandardScaler + MLPClassifier, one ReLU hidden layer, classes balanced by weight;
- prototype: one centroid per label of the L2-normalised embeddings, cosine similarity.

Cross-validation (StratifiedKFold, or StratifiedGroupKFold with groups: no group in two
folds) gives held-out logits for every clip; the temperature is fitted on them, each fold's
calibrated ECE on a temperature fitted on the other folds only. The final head is fitted on
every clip, converted once, and its numpy logits checked against the estimator's own.
"""

from __future__ import annotations

import numpy as np

from serve_app.heads import metrics
from serve_app.heads.headfile import Head

MLP_HIDDEN = 128
MAX_ITER = 1000
CONVERSION_TOLERANCE = 1e-5


class ConversionError(AssertionError):
    """The head's logits differ from the estimator's: the conversion is wrong."""


class Prototypes:
    """One unit centroid per class of the L2-normalised embeddings; logits are cosines."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> Prototypes:
        unit = _unit(X)
        self.classes_ = np.unique(y)
        self.centroids_ = _unit(np.stack([unit[y == c].mean(axis=0) for c in self.classes_]))
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return _unit(X) @ self.centroids_.T


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    return X / np.maximum(np.linalg.norm(X, axis=-1, keepdims=True), 1e-12)


def fit_estimator(kind: str, X: np.ndarray, y: np.ndarray, seed: int):
    """The fitted estimator of `kind` on embeddings X and label indices y."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.utils.class_weight import compute_sample_weight

    X = np.asarray(X, dtype=np.float64)
    if kind == "prototype":
        return Prototypes().fit(X, y)
    if kind == "linear":
        # lbfgs fits the multinomial (softmax) model for any number of classes
        estimator = make_pipeline(StandardScaler(), LogisticRegression(
            class_weight="balanced", max_iter=MAX_ITER, random_state=seed))
        return estimator.fit(X, y)
    estimator = make_pipeline(StandardScaler(), MLPClassifier(
        hidden_layer_sizes=(MLP_HIDDEN,), activation="relu", alpha=1e-3, max_iter=MAX_ITER,
        random_state=seed))
    # MLPClassifier has no class_weight: balanced sample weights do the same
    return estimator.fit(X, y, mlpclassifier__sample_weight=compute_sample_weight("balanced", y))


def tensors_of(kind: str, estimator) -> dict[str, np.ndarray]:
    """The head file's float32 tensors of a fitted estimator (classes in index order)."""
    if kind == "prototype":
        return {"centroids": estimator.centroids_.astype(np.float32)}
    scaler, model = estimator[0], estimator[-1]
    tensors = {"mean": scaler.mean_, "scale": scaler.scale_}
    if kind == "linear":
        weight, bias = model.coef_, model.intercept_
    else:
        tensors.update(hidden_weight=model.coefs_[0].T, hidden_bias=model.intercepts_[0])
        weight, bias = model.coefs_[1].T, model.intercepts_[1]
    if weight.shape[0] == 1:  # two classes: one logit z for the second; [0, z] is the same
        weight = np.vstack([np.zeros_like(weight), weight])
        bias = np.concatenate([np.zeros_like(bias), bias])
    tensors.update(weight=weight, bias=bias)
    return {name: np.asarray(array, dtype=np.float32) for name, array in tensors.items()}


def head_logits(kind: str, tensors: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """The served math (Head.logits) on these tensors."""
    return Head({"kind": kind}, tensors).logits(X)


def estimator_logits(kind: str, estimator, X: np.ndarray) -> np.ndarray:
    """The estimator's own logits, up to a constant per row: decision_function (binary:
    [0, z]), or the MLP's log-probabilities."""
    X = np.asarray(X, dtype=np.float64)
    if kind == "mlp":
        return np.log(np.maximum(estimator.predict_proba(X), 1e-300))
    found = estimator.decision_function(X)
    return np.stack([np.zeros_like(found), found], axis=1) if found.ndim == 1 else found


def check_conversion(kind: str, estimator, tensors: dict[str, np.ndarray],
                     X: np.ndarray) -> float:
    """The largest difference between the head's logits and the estimator's on X (each row
    centred: a softmax does not see a shift); ConversionError above CONVERSION_TOLERANCE."""
    ours, theirs = head_logits(kind, tensors, X), estimator_logits(kind, estimator, X)
    if kind != "prototype":
        ours = ours - ours.mean(axis=1, keepdims=True)
        theirs = theirs - theirs.mean(axis=1, keepdims=True)
    difference = float(np.abs(ours - theirs).max()) if len(X) else 0.0
    if not difference <= CONVERSION_TOLERANCE:
        raise ConversionError(f"the {kind} head's logits differ from scikit-learn's by "
                              f"{difference:.2e} (more than {CONVERSION_TOLERANCE})")
    return difference


def splits(y: np.ndarray, groups: np.ndarray | None, folds: int,
           seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) index pairs: stratified by label, groups never split."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if groups is None:
        return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(y, y))
    return list(StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(
        y, y, groups))


def cross_validate(kind: str, X: np.ndarray, y: np.ndarray, folds, seed: int,
                   labels: list[str]) -> tuple[dict, float]:
    """({"overall", "folds"} metrics, the temperature fitted on every held-out logit)."""
    held_out = np.zeros((len(y), len(labels)))
    for train, test in folds:
        estimator = fit_estimator(kind, X[train], y[train], seed)
        held_out[test] = head_logits(kind, tensors_of(kind, estimator), X[test])
    temperature = metrics.fit_temperature(held_out, y)
    per_fold, calibrated = [], np.zeros_like(held_out)
    for _, test in folds:
        # this fold's temperature from the others' held-out logits: an honest ECE after
        others = np.setdiff1d(np.arange(len(y)), test)
        fold_t = metrics.fit_temperature(held_out[others], y[others])
        calibrated[test] = metrics.softmax(held_out[test], fold_t)
        found = metrics.report(y[test], held_out[test], labels, 1.0, fold_t)
        per_fold.append({**found, "temperature": fold_t})
    overall = metrics.report(y, held_out, labels)
    overall.update(ece_after=metrics.ece(calibrated, y), temperature=temperature)
    return {"overall": overall, "folds": per_fold}, temperature


def control(kind: str, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, folds: int,
            seed: int, labels: list[str]) -> dict:
    """The same cross-validation on shuffled labels: near chance when the pipeline does not
    leak (a head that also does well here learnt the folds, not the labels)."""
    shuffled = np.random.default_rng(seed).permutation(y)
    found, _ = cross_validate(kind, X, shuffled, splits(shuffled, groups, folds, seed), seed,
                              labels)
    overall = found["overall"]
    return {"ua": overall["ua"], "wa": overall["wa"], "macro_f1": overall["macro_f1"],
            "chance_ua": 1.0 / len(labels), "seed": seed}
