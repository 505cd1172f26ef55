"""The AutoML layer: an Optuna study over FlexUNet's architecture and training parameters."""
