"""avg@k / pass@k evaluation of a policy on a dataset."""

from dapo_rl.evaluation.evaluate import EvalResult, evaluate
from dapo_rl.evaluation.metrics import avg_at_k, mean_pass_at_k, pass_at_k

__all__ = ["EvalResult", "avg_at_k", "evaluate", "mean_pass_at_k", "pass_at_k"]
