"""The decoder and its base weights: config, attention and blocks, feed-forward and MoE, fused
projections, KV cache, chunked loss, reading and writing checkpoints. Knows nothing of LoRA."""
