"""Running one trial: its training, cross-validation, life cycle, and the refit's trials."""
