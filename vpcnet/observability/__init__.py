"""What an operator reads: Prometheus metrics, /healthz, logs."""
