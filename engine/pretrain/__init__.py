"""Reproducible pretraining of the bundled mini models in assets/."""
