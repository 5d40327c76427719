"""Adapter-level evaluation: A/B comparisons of adapter versions and baselines, a style judge that is
independent of the adapters, paired statistics, reports, and the live traffic split the service uses."""
