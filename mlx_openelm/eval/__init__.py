"""Evaluation: commonsense protocols, lm-eval backend, the paper table and the research methods."""
