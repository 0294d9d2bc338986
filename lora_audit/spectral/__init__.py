"""Spectral audit: intruder dimensions (Shuttleworth et al. 2024) and related measures."""
