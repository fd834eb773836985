"""Measurement: backends, latency, accuracy, and the latency-vs-accuracy report."""
