"""Evaluation half: sampling, the results table, evaluate, search, validate, report,
baselines, statistics over prompts, prompt sets. Never imports training."""
