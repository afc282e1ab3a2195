"""The calibration measures what is served: a layer's blocks compressed by the block probe rule, as the harness's
``zipcache-vllm`` / ``zipcache-adaptive`` caches (and the vLLM plugin) store them, not by the old rule (probes
over the whole context)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zipcache_vllm.eval import calibrate
from zipcache_vllm.eval.methods import Method
from zipcache_vllm.hf import cache as hf_cache
from zipcache_vllm.method.compressors import ZipCacheCompressor
from zipcache_vllm.method.config import ZipCacheConfig
from zipcache_vllm.method.saliency import attention_probs, column_sums, layer_probes, normalizer_counts

BLOCK = 32  # 3 context blocks + 1 continuation block; 4 probes per block (2 recent + 2 random)
CONTEXT, CONTINUATION = 96, 32


def _tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, num_hidden_layers=1, vocab_size=300, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _attention_output(model, ids, attn_implementation, cache=None):
    """Layer 0's attention output (the input of ``o_proj``), ``[1, L, num_heads * head_size]``."""
    seen = []
    hook = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model.set_attn_implementation(attn_implementation)
    try:
        model(input_ids=ids, past_key_values=cache, use_cache=cache is not None)
    finally:
        hook.remove()
    return seen[0]


def _old_rule_output(base, q, k, v, scaling):
    """The pre-block-rule calibration: probes over the whole context score the context's blocks."""
    kb, vb = k.to(hf_cache.STORE_DTYPE).float(), v.to(hf_cache.STORE_DTYPE).float()
    pos = layer_probes(base, CONTEXT, 0)
    probs = attention_probs(q[:, :, pos], k[:, :, :CONTEXT], pos, scaling)
    scores = column_sums(probs, k.shape[1]) / normalizer_counts(pos, CONTEXT, base.normalizer)
    comp = ZipCacheCompressor(base)
    segs = [comp.compress(kb[:, :, i : i + BLOCK], vb[:, :, i : i + BLOCK], scores[..., i : i + BLOCK])
            for i in range(0, CONTEXT, BLOCK)]
    kk = torch.cat([*(s.k for s in segs), kb[:, :, CONTEXT:]], dim=2)
    vv = torch.cat([*(s.v for s in segs), vb[:, :, CONTEXT:]], dim=2)
    return calibrate._attend(q[:, :, CONTEXT:], kk, vv, CONTEXT, scaling)


@torch.inference_mode()
def test_calibration_compresses_a_layer_as_the_harness_serves_it():
    model = _tiny()
    ids = torch.randint(0, 300, (1, CONTEXT + CONTINUATION), generator=torch.Generator().manual_seed(3))
    base = ZipCacheConfig.load("vllm", block_size=BLOCK, salient_ratio=0.5, value_salient_ratio=0.5)
    calibrate._captured.clear()
    _attention_output(model, ids, calibrate.ATTN_IMPLEMENTATION)
    q, k, v, scaling = calibrate._captured[0]
    ours = calibrate.compressed_attention(base, 0, q, k, v, scaling, CONTEXT, key_rows=16)  # [1, Hq, T, D]
    ours = ours.transpose(1, 2).reshape(1, CONTINUATION, -1)

    method = Method.parse(f"zipcache-vllm:block_size={BLOCK},salient_ratio=0.5,value_salient_ratio=0.5")
    served = _attention_output(model, ids, hf_cache.ATTN_IMPLEMENTATION, method.make_cache(model.config))
    torch.testing.assert_close(ours, served[:, CONTEXT:], atol=1e-5, rtol=1e-5,
                               msg="calibrate does not compress the layer as the harness's block rule does")

    old = _old_rule_output(base, q, k, v, scaling).transpose(1, 2).reshape(1, CONTINUATION, -1)
    assert (old - served[:, CONTEXT:]).abs().max() > 1e-3, "the two rules agree here: the test cannot tell them apart"


@torch.inference_mode()
def test_layer_errors_have_one_entry_per_split_and_kv_head():
    model = _tiny()
    ids = torch.randint(0, 300, (1, CONTEXT + CONTINUATION), generator=torch.Generator().manual_seed(4))
    base = ZipCacheConfig.load("vllm", block_size=BLOCK, salient_ratio=0.5, value_salient_ratio=0.5)
    calibrate._captured.clear()
    _attention_output(model, ids, calibrate.ATTN_IMPLEMENTATION)
    q, k, v, scaling = calibrate._captured[0]
    choices = calibrate.key_row_choices(BLOCK, 32)  # [0, 16, 32]
    err = calibrate.layer_errors(base, 0, q, k, v, scaling, CONTEXT, choices)
    assert err.shape == (3, 2) and bool((err > 0).all())
