"""The reference compressed caches on the real bundled model (SmolLM2-135M-Instruct, fp32 compute)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from zipcache_vllm.eval import harness as H
from zipcache_vllm.eval.methods import ALL_METHODS, Method
from zipcache_vllm.hf import cache as hf_cache
from zipcache_vllm.method import quant
from zipcache_vllm.method.config import ZipCacheConfig, salient_count

pytestmark = pytest.mark.model

PROMPT = [{"role": "user", "content": "Explain in two sentences why the sky is blue, then name three colours."}]


@pytest.fixture(scope="module")
def m():
    return H.load_model(None, "float32")


@pytest.fixture(scope="module")
def prompt_ids(m):
    ids = m.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return ids["input_ids"]


@pytest.fixture(scope="module")
def text_ids(m):
    with open(quant.__file__) as f:
        text = f.read() * 3
    return m.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :320]


def _logits(m, ids, cache):
    with torch.inference_mode():
        return m.model(input_ids=ids, past_key_values=cache, use_cache=True).logits


def test_bf16_method_matches_dynamic_cache(m, text_ids):
    """Our cache with no compression = DynamicCache up to the bf16 rounding of stored K/V."""
    ctx, cont = text_ids[:, :256], text_ids[:, 256:]
    ref_cache, our_cache = DynamicCache(), Method.parse("bf16").make_cache(m.config)
    ref = torch.cat([_logits(m, ctx, ref_cache)[:, -1:], _logits(m, cont[:, :-1], ref_cache)], 1)
    ours = torch.cat([_logits(m, ctx, our_cache)[:, -1:], _logits(m, cont[:, :-1], our_cache)], 1)
    ppl_ref = math.exp(F.cross_entropy(ref[0], cont[0]).item())
    ppl_ours = math.exp(F.cross_entropy(ours[0], cont[0]).item())
    assert abs(ppl_ours / ppl_ref - 1) < 0.02, (ppl_ref, ppl_ours)
    assert (ref.argmax(-1) == ours.argmax(-1)).float().mean() > 0.95
    assert our_cache.get_seq_length() == text_ids.shape[1] - 1


def test_generate_with_zipcache(m, prompt_ids):
    cache = hf_cache.ZipCache(ZipCacheConfig(window=8), model_config=m.config)
    out = m.model.generate(prompt_ids, max_new_tokens=12, do_sample=False, past_key_values=cache)
    text = m.tokenizer.decode(out[0, prompt_ids.shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0
    n = prompt_ids.shape[1]
    layer = cache.layers[0]
    # prompt compressed as one segment, then decode windows of 8 tokens
    assert layer.segments[0].num_tokens == n
    assert all(s.num_tokens == 8 for s in layer.segments[1:])
    assert layer.num_compressed + layer.window_k.shape[2] == cache.get_seq_length() == out.shape[1] - 1


def test_paged_semantics_compress_complete_blocks_only(m, prompt_ids):
    cfg = ZipCacheConfig.load("paged", block_size=16)
    cache = hf_cache.ZipCache(cfg, model_config=m.config)
    n = prompt_ids.shape[1]
    _logits(m, prompt_ids, cache)
    layer = cache.layers[3]
    assert [s.num_tokens for s in layer.segments] == [16] * (n // 16)
    assert layer.window_k.shape[2] == n % 16
    frozen = {k: v.clone() for k, v in layer.segments[0].stored.items()}
    # decode until one more block completes: earlier blocks must never be re-quantized
    tok = torch.tensor([[m.tokenizer.eos_token_id]])
    for _ in range(16 - n % 16):
        _logits(m, tok, cache)
    assert [s.num_tokens for s in layer.segments] == [16] * (n // 16 + 1)
    assert layer.window_k.shape[2] == 0
    for k, v in layer.segments[0].stored.items():
        assert torch.equal(v, frozen[k]), f"block 0 tensor {k} changed after later compression"


def test_zipcache_stored_bytes_match_the_layout(m, prompt_ids):
    """Bytes are counted from stored tensors; check them against an independent count."""
    cfg = ZipCacheConfig()
    cache = hf_cache.ZipCache(cfg, model_config=m.config)
    _logits(m, prompt_ids, cache)
    n, h, d = prompt_ids.shape[1], m.config.num_key_value_heads, 64
    s = salient_count(n, cfg.salient_ratio)
    codes = 2 * h * (s * d * 4 // 8 + (n - s) * d * 2 // 8)  # K and V
    k_params = h * 4 * d * 2  # (step, mn) x (high, low) per channel, fp16
    v_params = h * (d * 2 + n * 2 * 2)  # c per channel + (step, mn) per token, fp16
    mask = h * math.ceil(n / 8)
    per_layer = codes + k_params + v_params + mask
    nb = cache.nbytes()
    assert nb["window"] == 0
    assert nb["compressed"] == per_layer * m.config.num_hidden_layers
    assert nb["saliency"] == 0  # no window tokens, no pending scores


def test_reference_segments_reconstruct_from_the_quantizers(m, prompt_ids):
    """The cache's dequantized keys equal ZC-3 applied directly to the stored bf16 keys."""
    cfg = ZipCacheConfig(salient_ratio=0.5)
    cache = hf_cache.ZipCache(cfg, model_config=m.config)
    dyn = DynamicCache()
    _logits(m, prompt_ids, cache)
    _logits(m, prompt_ids, dyn)
    # layer 0: its keys depend on the embeddings only (later layers see the bf16-rounded prefill attention)
    layer = cache.layers[0]
    k_bf16 = dyn.layers[0].keys.to(torch.bfloat16).float()
    mask = quant.unpack_bits(layer.segments[0].stored["k_salient_mask"], 1)[..., : k_bf16.shape[2]].bool()
    assert (mask.sum(-1) == salient_count(k_bf16.shape[2], 0.5)).all()
    hi, lo = quant.quantize_channelwise_mixed(k_bf16, mask, 4, 2)
    expect = quant.select_mixed(hi.dequantize(), lo.dequantize(), mask)
    torch.testing.assert_close(layer._ck, expect, atol=0, rtol=0)


def test_missing_attention_hookup_is_a_clear_error(m, prompt_ids):
    m.model.set_attn_implementation("sdpa")
    try:
        cache = hf_cache.ZipCache(ZipCacheConfig(), model_config=m.config)
        with pytest.raises(RuntimeError, match="attn_implementation='zipcache'"):
            _logits(m, prompt_ids, cache)
    finally:
        hf_cache.enable(m.model)


@pytest.mark.parametrize("spec", ALL_METHODS)
def test_every_method_runs_and_counts_its_bytes(m, text_ids, spec):
    if spec.startswith("quanto"):
        pytest.importorskip("optimum.quanto")
    meth = Method.parse(spec)
    windows = [text_ids[0, :288]]
    r = H.perplexity(m, meth, windows, context_len=256)
    assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
    bf16 = m.bf16_bytes_per_token
    assert r["bytes_per_token"] > 0
    if spec == "bf16":
        assert r["bytes_per_token"] == bf16 and r["compression_ratio"] == 1.0
    else:
        assert r["bytes_per_token"] < bf16, f"{spec} stores {r['bytes_per_token']} B/token >= bf16 {bf16}"
    assert ("paper_ratio" in r) == spec.startswith("zipcache")


def test_compression_ordering_on_real_text(m, text_ids):
    """Sanity of the harness on real text: int8 ~ bf16, int2 much worse, ZipCache in between."""
    windows = [text_ids[0, :320]]
    ppl = {s: H.perplexity(m, Method.parse(s), windows, context_len=256)["perplexity"]
           for s in ("bf16", "int8", "int2", "zipcache")}
    assert abs(ppl["int8"] / ppl["bf16"] - 1) < 0.02
    assert ppl["int2"] > ppl["zipcache"] > ppl["bf16"] * 0.98
