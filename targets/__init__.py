"""Hardware targets: latency measurement, device profiles and latency prediction."""
