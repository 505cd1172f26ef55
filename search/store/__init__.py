"""Storage: Optuna storages, artifact stores, the gRPC proxy, and the adapter to Optuna's private names."""
