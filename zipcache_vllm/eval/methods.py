"""Method names of the evaluation harness -> caches.

A method spec is ``NAME`` or ``NAME:key=value,key=value`` (e.g. ``zipcache:salient_ratio=0.4,bits_high=8``).

===================  =============================================================================================
``bf16``             no compression; K/V stored in bf16 (the reference)
``int8/int4/int2``   uniform asymmetric per (token, KV head), vLLM's ``int*_per_token_head`` granularity
``kivi2/kivi4``      KIVI: keys per channel in groups of 32 tokens, values per token, bf16 residual of 128
``zipcache``         the paper: prompt = one segment, global top-k, K channelwise per group, V CST, probes
``zipcache-accum``   ablation: accumulated (H2O/MiKV) saliency over the full attention matrix
``zipcache-random``  ablation: salient tokens drawn at random
``zipcache-quota``   ``zipcache`` with a per-block quota of salient tokens (the constraint of a fixed-size page)
``zipcache-paged``   vLLM paged semantics: complete blocks compressed one by one, per-block statistics and quota
``zipcache-vllm``    the vLLM plugin's default (preset ``vllm``): ``zipcache-paged`` with salient shares 0.8 (keys)
                     and 0.2 (values)
``zipcache-adaptive`` preset ``adaptive``: the bytes of ``zipcache-vllm`` (its total of salient rows per block),
                     split per layer between keys and values by the calibration (configs/calibration/)
``quanto-int4/int2`` transformers ``QuantizedCache`` with optimum-quanto (a peer), bf16 residual of 128
===================  =============================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..hf.cache import STORE_DTYPE, CompressedCache
from ..method.compressors import KiviCompressor, NoCompression, TokenwiseCompressor, ZipCacheCompressor
from ..method.config import ZipCacheConfig
from ..method.quant import paper_ratio

ZIPCACHE_VARIANTS: dict[str, dict[str, Any]] = {
    "zipcache": {},
    "zipcache-accum": {"saliency": "accumulated", "probe_recent": 1.0, "probe_random": 0.0},
    "zipcache-random": {"saliency": "random"},
    "zipcache-quota": {"selection": "quota"},
    "zipcache-paged": {"selection": "quota", "granularity": "block"},
    "zipcache-vllm": {"selection": "quota", "granularity": "block", "salient_ratio": 0.8, "value_salient_ratio": 0.2},
    "zipcache-adaptive": {"selection": "quota", "granularity": "block", "salient_ratio": 0.8,
                          "value_salient_ratio": 0.2, "calibration": "adaptive"},
}
BASELINES = ("bf16", "int8", "int4", "int2", "kivi2", "kivi4", "quanto-int4", "quanto-int2")
ALL_METHODS = (*BASELINES[:6], *ZIPCACHE_VARIANTS, *BASELINES[6:])


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"zipcache:salient_ratio=0.4"`` -> ``("zipcache", {"salient_ratio": 0.4})``."""
    name, _, rest = spec.strip().partition(":")
    opts: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"bad option {item!r} in method {spec!r}: expected key=value")
        opts[key.strip()] = _parse_value(value)
    if name not in ALL_METHODS:
        raise ValueError(f"unknown method {name!r}; choose from: {', '.join(ALL_METHODS)}")
    return name, opts


@dataclass
class Method:
    spec: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> Method:
        name, opts = parse_spec(spec)
        m = cls(spec.strip(), name, opts)
        m.make_compressor()  # validate options early
        return m

    @property
    def is_zipcache(self) -> bool:
        return self.name.startswith("zipcache")

    def zipcache_config(self) -> ZipCacheConfig:
        return ZipCacheConfig.load("default", **{**ZIPCACHE_VARIANTS[self.name], **self.options})

    def make_compressor(self):
        opts = dict(self.options)
        if self.is_zipcache:
            return ZipCacheCompressor(self.zipcache_config(), name=self.name)
        if self.name.startswith("quanto"):
            _check_keys(self.spec, opts, {"q_group_size", "residual_length"})
            return None
        if self.name == "bf16":
            _check_keys(self.spec, opts, set())
            return NoCompression()
        if self.name.startswith("kivi"):
            _check_keys(self.spec, opts, {"group_size", "residual"})
            return KiviCompressor(int(self.name[4:]), **opts)
        _check_keys(self.spec, opts, set())
        return TokenwiseCompressor(int(self.name[3:]))

    def make_cache(self, model_config):
        n = model_config.num_hidden_layers
        if self.name.startswith("quanto"):
            return _quanto_cache(int(self.name[-1]), n, **self.options)
        cache = CompressedCache(self.make_compressor(), n)
        if self.is_zipcache:
            cfg = self.zipcache_config()
            if cfg.layer_salient_ratios is not None or cfg.calibration is not None:
                cfg = cfg.for_model(n, model_config.num_key_value_heads, _head_size(model_config))
                for i, layer in enumerate(cache.layers):  # a compressor per layer: its own salient split
                    layer.compressor = ZipCacheCompressor(cfg.for_layer(i), name=self.name)
        return cache

    def describe(self) -> dict[str, Any]:
        if self.name.startswith("quanto"):
            return {"method": self.name, "nbits": int(self.name[-1]), "q_group_size": 64, "residual_length": 128,
                    "axis_key": 0, "axis_value": 0, **self.options}
        return self.make_compressor().describe()

    def paper_ratio(self, tokens: int, channels: int) -> float | None:
        """ZC-4 for ZipCache methods (batch 1, ``channels`` = KV heads x head size), else None."""
        if not self.is_zipcache:
            return None
        c = self.zipcache_config()
        r = (c.salient_ratio + c.v_salient_ratio) / 2
        return paper_ratio(r, tokens, channels=channels, batch=1, bits_high=c.bits_high, bits_low=c.bits_low)


def _head_size(model_config) -> int:
    return getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads


def _check_keys(spec: str, opts: dict, allowed: set[str]) -> None:
    bad = sorted(set(opts) - allowed)
    if bad:
        raise ValueError(f"method {spec!r} takes no option(s) {bad}; allowed: {sorted(allowed) or 'none'}")


# ----------------------------------------------------------------------------------------- quanto (peer)
def _quanto_cache(nbits: int, num_layers: int, q_group_size: int = 64, residual_length: int = 128):
    """transformers' QuantizedCache(backend="quanto"), storing bf16 (as a bf16 deployment would) even when the
    model computes in fp32, so that its residual and scales are not charged 4 bytes."""
    from transformers.cache_utils import Cache, QuantoQuantizedLayer

    class Bf16QuantoLayer(QuantoQuantizedLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            dt = key_states.dtype
            k, v = super().update(key_states.to(STORE_DTYPE), value_states.to(STORE_DTYPE))
            return k.to(dt), v.to(dt)

        def nbytes(self) -> dict[str, int]:
            comp = sum(_tensor_bytes(t) for t in (self._quantized_keys, self._quantized_values) if t is not None)
            window = sum(_tensor_bytes(t) for t in (self.keys, self.values) if t is not None)
            return {"compressed": comp, "window": window, "saliency": 0}

    class QuantoCache(Cache):
        def __init__(self):
            super().__init__(layers=[Bf16QuantoLayer(nbits, 0, 0, q_group_size, residual_length)
                                     for _ in range(num_layers)])

        def nbytes(self) -> dict[str, int]:
            total = {"compressed": 0, "window": 0, "saliency": 0}
            for layer in self.layers:
                for k, v in layer.nbytes().items():
                    total[k] += v
            total["total"] = sum(total.values())
            return total

    return QuantoCache()


def _tensor_bytes(t) -> int:
    """Bytes of a tensor, looking through tensor subclasses (quanto) at the inner tensors they store."""
    if t is None:
        return 0
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()
