"""Defining a study: the study file, the search space, the samplers, the time budget, the folds and the planner."""
