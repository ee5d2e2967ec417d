"""The hash of a set of named weights: the rule the base fingerprint uses (fingerprint.py).

Low in the layers so that injection can hash the weights PiSSA is about to replace.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from minilora.core.errors import AdapterError


def hash_weights(weights: Mapping[str, torch.Tensor]) -> str:
    """base_fingerprint's hash of {layer path: weight}: each path, shape and the values rounded
    to bfloat16 (a float32 base and its bfloat16 copy share it).

    Each weight is taken from ``weights`` when it is hashed, so a mapping that reads them from a
    file holds one at a time.

    Raises:
        AdapterError: a weight on the meta device (it has no values).
    """
    h = hashlib.sha256(b"minilora-fingerprint-1\0")
    for name in sorted(weights):
        w = weights[name]
        if w.is_meta:
            raise AdapterError(f"{name}.weight is on the meta device: it has no values to hash")
        h.update(f"{name}:{tuple(w.shape)}\0".encode())
        bits = w.detach().to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.int16)
        h.update(bits.numpy().tobytes())
    return "sha256:" + h.hexdigest()
