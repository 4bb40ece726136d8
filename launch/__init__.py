"""recbalance: launch."""
