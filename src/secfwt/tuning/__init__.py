"""Forward-only prompt tuning (BBT, Sun et al. 2022; SecFwT/SecP-Tuning, arXiv 2506.15307): tasks, data,
the evaluator interface, the CMA-ES loop, checkpoints and reports."""
