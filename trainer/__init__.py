"""recbalance: trainer."""
