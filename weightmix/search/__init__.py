"""Merge search: optimise a recipe's marked values against a score with Optuna, trials run here,
in local processes or on a Ray cluster (see spec.py for the file, run.py for how it runs)."""
