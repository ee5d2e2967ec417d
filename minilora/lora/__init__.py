"""The LoRA layer and what works on it in memory: settings, the layer, named adapters,
injection and merge, quantized bases, the base fingerprint. Works on any nn.Module; knows
nothing of minilora's decoder."""
