"""Modality-agnostic evaluation of frozen representations.

Everything here works on ``(N, D)`` feature tensors with int64 labels (or on a
caller-supplied embedding function, for :func:`extract_features`):

* :func:`extract_features`, :class:`FeatureCache`, :func:`make_key` - get and cache features;
* :func:`knn_classify` - weighted kNN (Wu et al. 2018, as in DINO);
* :func:`linear_probe`, :func:`logistic_regression` - linear evaluation;
* :func:`svm_probe` - an RBF SVM with a cross-validated C (TS2Vec's protocol);
* :func:`few_shot` - N-way K-shot episodes with logistic regression;
* :func:`diagnose` and friends - collapse / rank / alignment-uniformity diagnostics;
* :func:`format_table` - print any of the result dicts above.
"""

from selfsup.eval.diagnostics import (
    alignment,
    class_separation,
    diagnose,
    format_table,
    mean_pair_cosine,
    per_dim_std,
    rankme,
    uniformity,
)
from selfsup.eval.features import FeatureCache, extract_features, make_key
from selfsup.eval.fewshot import few_shot
from selfsup.eval.knn import knn_classify
from selfsup.eval.linear import linear_probe, logistic_regression, svm_probe

__all__ = [
    "FeatureCache",
    "alignment",
    "class_separation",
    "diagnose",
    "extract_features",
    "few_shot",
    "format_table",
    "knn_classify",
    "linear_probe",
    "logistic_regression",
    "make_key",
    "mean_pair_cosine",
    "per_dim_std",
    "rankme",
    "svm_probe",
    "uniformity",
]
