"""The evaluate wing (`make eval`, jobs/eval.py): reports, long-form and forgetting checks."""
