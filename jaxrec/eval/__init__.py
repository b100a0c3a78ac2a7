"""Offline ranking and simulator evaluation, and the baselines they are compared with.

    protocol = leave_one_out_protocol(ratings)            # eval.data
    metrics = ranking_metrics(scores, protocol.targets)   # eval.metrics
"""

from jaxrec.eval.data import LeaveOneOut, leave_one_out_protocol
from jaxrec.eval.metrics import (
    candidate_scores,
    coverage,
    exclude_items,
    intra_list_diversity,
    mean_interval,
    novelty,
    ranking_metrics,
    target_ranks,
)

__all__ = [
    "LeaveOneOut",
    "candidate_scores",
    "coverage",
    "exclude_items",
    "intra_list_diversity",
    "leave_one_out_protocol",
    "mean_interval",
    "novelty",
    "ranking_metrics",
    "target_ranks",
]
