"""recbalance: models."""
