"""Adapter-level evaluation: A/B comparisons of adapter versions and baselines, a style judge that is
independent of the adapters, paired statistics and reports."""
