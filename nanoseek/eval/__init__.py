"""Evaluation: task scores (pass@1, maj@k) and the report card of a run (markdown + PNG plots).

    from nanoseek.eval import evaluate, score_samples
    result = evaluate(model, tok, get_task("arithmetic", level=2), n=200, k=4)   # nanoseek eval
    from nanoseek.eval.report import write_report                               # nanoseek report
"""

from .evaluate import evaluate, majority_correct, score_samples

__all__ = ["evaluate", "majority_correct", "score_samples"]
