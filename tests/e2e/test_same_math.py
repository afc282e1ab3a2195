"""Same math in both engines: ZipCache in vLLM against the transformers reference cache (``hf_cache``).

Two checks:

* **replay** (exact, no server): the post-RoPE queries, keys and values that the reference cache sees while the
  bundled model (fp32) prefills a 300-token prompt and decodes 100 tokens are fed, step by step, through the
  backend's vLLM-free function with vLLM-shaped metadata. Attention outputs must match the reference's SDPA to
  fp32 rounding, and the compressed pages must dequantize to exactly the reference's compressed blocks: same
  probe rows (the block rule), scores, salient sets, codes and parameters, at prefill and for the block
  completed during decode.
* **greedy agreement** through a real fp32 server, 20 prompts of 160-460 tokens (every one with compressed
  blocks and a bf16 tail, none chunked), 32 greedy tokens replayed through the reference. Engine numerics
  (vLLM's CPU kernels vs transformers' SDPA) differ in the last bits (bf16: 10 of 24 stock greedy runs split
  within 32 tokens; fp32: none), and quantization amplifies such differences (a last-bit change at a rounding
  boundary moves a 2-bit code by a whole step), so exact equality is reported, while the check is that every
  disagreement is a near-tie; the replay above is the exact check.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from zipcache_vllm.engine import paged
from zipcache_vllm.engine.block_manager import BlockManager
from zipcache_vllm.engine.layout import PageLayout
from zipcache_vllm.engine.staging import Staging
from zipcache_vllm.engine.step import prepare_step, zipcache_attention
from zipcache_vllm.method.config import ZipCacheConfig
from zipcache_vllm.method.saliency import num_block_probes
from zipcache_vllm.plugin import envs

MODEL = "smollm2"
DATA = Path(__file__).resolve().parents[2] / "data"
STEPS = 32


@pytest.fixture(scope="module")
def hf32():
    from zipcache_vllm.eval import harness

    return harness.load_model(None, "float32")


def agreement_prompts(tokenizer, n: int = 24) -> list[list[int]]:
    """Chat prompts with a different prose passage in front of each question: 160-460 tokens (beyond the 24
    questions, the questions again with later passages)."""
    prose = (DATA / "prose.txt").read_text()
    rows = [json.loads(line)["prompt"] for line in (DATA / "agreement_prompts.jsonl").read_text().splitlines()]
    out = []
    for i in range(n):
        p = rows[i % len(rows)]
        passage = prose[i * 700 : i * 700 + 450 + 40 * (i % len(rows))]
        text = p.replace("<|im_start|>user\n", f"<|im_start|>user\nRead this first:\n{passage}\n\n", 1)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"][:460])
    return out


# ------------------------------------------------------------------------------------------------- replay
def record_reference(hf, ids: list[int], steps: int):
    """Greedy decode with the reference ZipCache; returns the cache and, per layer, the (query, new key, new
    value, attention output) of every step, as the zipcache attention function saw them."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from zipcache_vllm.eval import harness
    from zipcache_vllm.hf import cache as hf_cache

    calls: dict[int, list] = {}

    def recording(module, query, key, value, attention_mask, **kw):
        out, w = hf_cache.zipcache_attention(module, query, key, value, attention_mask, **kw)
        q = query.shape[2]
        calls.setdefault(module.layer_idx, []).append(
            (query[0].transpose(0, 1).clone(), key[0, :, -q:].transpose(0, 1).clone(),
             value[0, :, -q:].transpose(0, 1).clone(), out[0].clone())
        )
        return out, w

    AttentionInterface.register("zipcache_record", recording)
    AttentionMaskInterface.register("zipcache_record", sdpa_mask)
    hf.model.set_attn_implementation("zipcache_record")
    try:
        cache = hf_cache.ZipCache(ZipCacheConfig.load(envs.DEFAULT_CONFIG), model_config=hf.config)
        harness.decode_steps(hf, torch.tensor(ids), cache, steps, forced=torch.full((steps,), 504))
    finally:
        hf.model.set_attn_implementation(hf_cache.ATTN_IMPLEMENTATION)
    return cache, calls


@pytest.mark.parametrize("layer", [0, 14, 29])
def test_replay_matches_the_reference_cache_exactly(hf32, layer):
    ids = [p for p in agreement_prompts(hf32.tokenizer) if len(p) >= 300][0][:300]  # 2 blocks + 44 staged
    steps = 100  # the staged block completes at decode step 84
    cfg = ZipCacheConfig.load(envs.DEFAULT_CONFIG)
    ref_cache, calls = record_reference(hf32, ids, steps)
    steps_seen = calls[layer]
    h, d = steps_seen[0][1].shape[1:]
    lay = PageLayout.from_config(cfg, d)
    n = lay.block_size
    num_blocks = 8
    pages = torch.zeros(num_blocks, h, lay.page_bytes, dtype=torch.uint8)
    staging = Staging.allocate(4, n, h, d, steps_seen[0][0].shape[1], num_block_probes(cfg, n))
    bm = BlockManager(4, n)
    block_table = torch.tensor([[5, 2, 7, 1]], dtype=torch.int32)  # any page ids
    ctx = 0
    for i, (q, k, v, ref_out) in enumerate(steps_seen):
        ql = q.shape[0]
        pos = torch.arange(ctx, ctx + ql)
        slots = block_table[0, pos // n].long() * n + pos % n
        seq_lens = torch.tensor([ctx + ql], dtype=torch.int32)
        qsl = torch.tensor([0, ql], dtype=torch.int32)
        plan = bm.plan(block_table.tolist(), [ctx], [ql])
        step = prepare_step(plan, qsl, seq_lens, block_table)
        out = zipcache_attention(q, k, v, pages, block_table, seq_lens, qsl, slots, staging, step, lay, cfg,
                                 layer_idx=layer, scale=d**-0.5, out=torch.empty(q.shape))
        torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4, msg=f"layer {layer}, step {i}")
        ctx += ql
    ref_layer = ref_cache.layers[layer]
    num_pages = ref_layer.num_compressed // n
    assert ctx == len(ids) + steps - 1 and num_pages == ctx // n == 3
    got_k, got_v = paged.dequantize_pages(pages, block_table[0, :num_pages], lay)
    torch.testing.assert_close(got_k.reshape(-1, h, d), ref_layer._ck[0].transpose(0, 1), atol=0, rtol=0)
    torch.testing.assert_close(got_v.reshape(-1, h, d), ref_layer._cv[0].transpose(0, 1), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------- greedy agreement
def vllm_greedy(server, ids: list[int]) -> tuple[list[int], list[float]]:
    r = server.client().completions.create(model=MODEL, prompt=ids, max_tokens=STEPS, temperature=0, logprobs=1,
                                           extra_body={"return_token_ids": True})
    return list(r.choices[0].token_ids), list(r.choices[0].logprobs.token_logprobs)


def reference_replay(hf, ids: list[int], tokens: list[int]) -> torch.Tensor:
    """Log-probabilities of the reference cache, teacher-forced on ``tokens``: ``[len(tokens), vocab]``."""
    from zipcache_vllm.eval import harness
    from zipcache_vllm.hf.cache import ZipCache

    cache = ZipCache(ZipCacheConfig.load(envs.DEFAULT_CONFIG), model_config=hf.config)
    _, logits, _ = harness.decode_steps(hf, torch.tensor(ids), cache, len(tokens), forced=torch.tensor(tokens))
    return torch.log_softmax(logits, dim=-1)


@pytest.fixture(scope="module")
def zipcache_fp32_server(e2e_tmp, start_server):
    from zipcache_vllm.models import resolve_model

    args = ("--kv-cache-backend", "zipcache", "--max-num-seqs", "4", "--max-num-batched-tokens", "512")
    with start_server(e2e_tmp, *args, name="zipcache_fp32", model=resolve_model(None, "float32"),
                      dtype="float32") as s:
        yield s


def test_greedy_agreement_with_the_reference(hf32, zipcache_fp32_server):
    """vLLM's greedy tokens replayed through the reference: where the reference's own argmax would differ, the
    two candidates must be close (an engine rounding amplified by one quantization step decides, not the
    integration). The reference's free
    greedy run equals vLLM's exactly when its argmax agrees at every position."""
    # ZIPCACHE_AGREEMENT_PROMPTS=N (opt-in, e.g. 72): the distribution of the gaps over more prompts, printed per
    # prompt; the bounds below are for the default 20
    prompts = agreement_prompts(hf32.tokenizer, int(os.environ.get("ZIPCACHE_AGREEMENT_PROMPTS", "20")))
    lengths = [len(p) for p in prompts]
    gaps, dlps = [], []
    assert min(lengths) > 128 and max(lengths) <= 512, lengths
    exact, agree, total, worst_gap, worst_dlp = 0, 0, 0, 0.0, 0.0
    for ids in prompts:
        tokens, vllm_lp = vllm_greedy(zipcache_fp32_server, ids)
        lp = reference_replay(hf32, ids, tokens)
        want = torch.tensor(tokens)
        hit = lp.argmax(-1) == want
        agree, total = agree + int(hit.sum()), total + len(tokens)
        exact += bool(hit.all())
        ref_lp = lp.gather(1, want.view(-1, 1)).squeeze(1)
        dlps.append(float((ref_lp - torch.tensor(vllm_lp)).abs().max()))
        worst_dlp = max(worst_dlp, dlps[-1])
        gaps.append(0.0)
        if not hit.all():
            j = int((~hit).nonzero()[0])
            gaps[-1] = float(lp[j].max() - lp[j, tokens[j]])
            worst_gap = max(worst_gap, gaps[-1])
    print(f"\nzipcache vLLM vs zipcache transformers reference (fp32, {len(prompts)} prompts of {min(lengths)}-"
          f"{max(lengths)} tokens, {STEPS} greedy tokens): identical greedy output on {exact / len(prompts):.0%} of "
          f"prompts; reference argmax = vLLM token on {agree / total:.1%} of positions; largest logit gap at a "
          f"disagreement {worst_gap:.3f} nats; largest |delta logprob| {worst_dlp:.3f}")
    print("gap at the first disagreement per prompt (0: identical):", json.dumps([round(g, 4) for g in gaps]))
    print("largest |delta logprob| per prompt:", json.dumps([round(x, 4) for x in dlps]))
    assert agree / total >= 0.97
    # Disagreements must stay small. Layout v1 quotas (103/26 rows) measured 0.016 nats / 0.213 here; layout v2
    # (96/32) measures 0.336 / 0.458 on the same prompts at the same commit (only the quota rule toggled): with
    # fewer 4-bit key rows a last-bit K/V difference that moves a token across the salient boundary, or a
    # 2-bit code across a step, shifts a logit by a whole quantization step. The exact replay above proves
    # the two implementations bit-identical on the same inputs; these bounds catch an integration error.
    # Block attention (issue 13) lets such a difference travel through the prompt too. The largest gap over the
    # prompts is therefore decided by rare events: the engines sum attention in different orders, and once in a
    # few dozen prompts a last-bit difference crosses a quantization boundary in some layer, after which the
    # caches differ by a whole step. Over 72 prompts (ZIPCACHE_AGREEMENT_PROMPTS=72) the masked-SDPA CPU prefill
    # (cb9b954) shows it on one prompt (0.589 nats; 67 % identical, 98.6 % of positions) and the blockwise one
    # (this code) on two (1.21, 2.14 nats; 61 %, 98.2 %); on every other prompt both give the same small gaps
    # (<= 0.28, mostly equal digit for digit). A bound on the maximum measures that luck; an integration error
    # moves most prompts. So: at most 10 % of the prompts (at least one) beyond 0.5 nats or 0.8 in logprob.
    outliers = sum(g >= 0.5 or x >= 0.8 for g, x in zip(gaps, dlps, strict=True))
    assert outliers <= max(1, len(prompts) // 10), f"{outliers} prompts beyond the near-tie bounds: {gaps} {dlps}"
    assert exact / len(prompts) >= 0.5
