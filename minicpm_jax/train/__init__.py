"""Training: optimizer (AdamW + muP + WSD), chunked loss, the shared step engine, checkpoints, the loop."""
