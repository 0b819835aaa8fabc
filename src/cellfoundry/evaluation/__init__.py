"""Metrics shared by tests and benchmarks: annotation, scIB-style integration, embeddings,
perturbation responses, gene regulatory networks (BEELINE).

numpy, scipy and scikit-learn only: importing this package never imports torch.
"""

from cellfoundry.evaluation.classification import (
    PairedDifference,
    accuracy,
    macro_f1,
    paired_bootstrap,
    per_class_f1,
)
from cellfoundry.evaluation.embedding import knn_accuracy, knn_predictions
from cellfoundry.evaluation.grn import GoldStandard, gold_standard, grn_scores
from cellfoundry.evaluation.integration import (
    IntegrationScores,
    batch_silhouette,
    clisi,
    graph_connectivity,
    ilisi,
    integration_scores,
    label_silhouette,
    lisi_from_neighbors,
    nearest_neighbors,
    nmi_ari,
    paired_half_sample_differences,
)
from cellfoundry.evaluation.perturbation import perturbation_metrics

__all__ = [
    "GoldStandard",
    "gold_standard",
    "grn_scores",
    "IntegrationScores",
    "PairedDifference",
    "accuracy",
    "batch_silhouette",
    "clisi",
    "graph_connectivity",
    "ilisi",
    "integration_scores",
    "knn_accuracy",
    "knn_predictions",
    "label_silhouette",
    "lisi_from_neighbors",
    "macro_f1",
    "nearest_neighbors",
    "nmi_ari",
    "paired_bootstrap",
    "paired_half_sample_differences",
    "per_class_f1",
    "perturbation_metrics",
]
