"""Observing a run: metrics (torchrec.metrics NE/AUC/GAUC, throughput), the events the loop
reports and the sinks that consume them (console progress, history, the Prometheus exporter
and Pushgateway push, training.png), and the end-of-run table. ``python -m trainer.observe
baseline`` stores a run's QPS as the regression baseline."""
