"""The inspection service: a REST API over fitted or exported models, request batching,
Prometheus metrics with a drift signal, and the offline web dashboard (`defectlens serve`)."""
