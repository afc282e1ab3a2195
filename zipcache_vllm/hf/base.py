"""What the transformers caches of this package share (:mod:`hf_cache`, :mod:`hf_paged`).

A layer's ``Cache.update`` receives keys and values but not the queries, which saliency (and, in the paged
cache, attention itself) needs. So ``update`` leaves ``(cache, layer_idx)`` in a per-thread handshake, and the
attention function registered under the cache's ``attn_implementation`` takes it and hands the queries to that
layer. A second ``update`` of the same cache with the handshake still pending means that attention function
never ran: the model was loaded with another implementation.
"""

from __future__ import annotations

import threading

from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


class HandshakeCache(Cache):
    """A ``Cache`` whose layers need the queries of the attention that follows each ``update``."""

    handshake: threading.local  # one per attention implementation: ``pending`` is (cache, layer_idx) or None
    attn_implementation: str
    enable_hint: str  # how to switch a model to ``attn_implementation``
    what: str  # the cache, in the error message

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        pending = getattr(self.handshake, "pending", None)
        if pending is not None and pending[0] is self:
            raise RuntimeError(
                f"the {self.what} never saw the queries of the previous layer: load the model with "
                f"attn_implementation='{self.attn_implementation}' or call {self.enable_hint}"
            )
        out = self.layers[layer_idx].update(key_states, value_states)
        self.handshake.pending = (self, layer_idx)
        return out

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by kind (each layer's ``nbytes()``), summed over layers, plus ``total``."""
        total: dict[str, int] = {}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                total[k] = total.get(k, 0) + v
        total["total"] = sum(total.values())
        return total


def take_pending(handshake: threading.local, module):
    """The cache layer the last ``update`` left in ``handshake`` (which is cleared), or None; checks that the
    attention ``module`` runs for that layer."""
    pending = getattr(handshake, "pending", None)
    if pending is None:
        return None
    cache, layer_idx = pending
    handshake.pending = None
    if getattr(module, "layer_idx", layer_idx) != layer_idx:
        raise RuntimeError(f"cache updated layer {layer_idx} but attention ran for layer {module.layer_idx}")
    return cache.layers[layer_idx]


def register(attn_implementation: str, fn) -> None:
    """Register attention function ``fn`` with transformers under ``attn_implementation``, with SDPA's masks."""
    AttentionInterface.register(attn_implementation, fn)
    AttentionMaskInterface.register(attn_implementation, sdpa_mask)
