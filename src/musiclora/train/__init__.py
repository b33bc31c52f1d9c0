"""Training: DeepSpeed config, the per-worker loop, the Ray Train driver."""
