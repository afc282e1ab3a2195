"""Token saliency (method doc §5-6): accumulated (ZC-5) and normalized (ZC-6) attention, probes (ZC-7/8).

Shapes: ``query [b, num_heads, q, head_size]`` and ``key [b, num_kv_heads, l, head_size]`` (post-RoPE);
scores come back per KV head, ``[b, num_kv_heads, l]``, the query heads of a GQA group summed (as the
released code does).

Two probe rules, one per granularity:

* **segment** (the paper, ``granularity: segment``): the probes of a prompt are its most recent and random rows
  (:func:`layer_probes`), attending over the whole prompt; decode windows are scored by the decode queries.
* **block** (paged semantics, the vLLM plugin, ``granularity: block``): block ``b`` of a sequence is scored by
  the probes *of its own block* at fixed positions inside it (:func:`block_probe_offsets`: the last
  ``probe_recent`` share of the block plus a ``probe_random`` share drawn with a seed from ``probe_seed`` and
  the block index), each attending causally over the keys of that block only (:func:`block_saliency`). A
  page is then a function of the block's own keys and probe queries: the same whatever the prefill chunking,
  the batch, or whether prefill or decode filled the block.
"""

from __future__ import annotations

import functools
import math

import torch

from .config import Normalizer, Saliency, Selection, quota_count, salient_count


def probe_positions(
    num_tokens: int,
    probe_recent: float = 0.05,
    probe_random: float = 0.05,
    generator: torch.Generator | None = None,
    compat: bool = False,
) -> torch.Tensor:
    """Probe query positions (ZC-7): the most recent ``probe_recent`` share plus ``probe_random`` at random.

    Default rules: ceil(probe_recent * l) recent tokens (at least 1), round(probe_random * l) distinct random
    tokens from the rest, sorted. ``compat=True`` reproduces the released code: recent = positions
    floor(l - 0.05 l) ... l - 1, random = floor(0.05 l) positions drawn WITH replacement from the rest.
    Returns int64 positions (duplicates possible only in compat mode).
    """
    n = num_tokens
    if n <= 0:
        return torch.zeros(0, dtype=torch.long)
    if compat:
        start = min(math.floor(n - probe_recent * n), n - 1)
        n_rand = math.floor(probe_random * n) if start > 0 else 0
        rand = torch.randint(0, max(start, 1), (n_rand,), generator=generator)
    else:
        n_recent = min(n, max(1, math.ceil(probe_recent * n - 1e-9)))
        start = n - n_recent
        n_rand = min(start, round(probe_random * n))
        rand = torch.randperm(start, generator=generator)[:n_rand] if n_rand > 0 else torch.zeros(0, dtype=torch.long)
    recent = torch.arange(start, n, dtype=torch.long)
    return torch.cat([rand.sort().values, recent])


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    query_pos: torch.Tensor,
    scale: float | None = None,
    key_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 causal softmax of ``query`` rows at positions ``query_pos`` over ``key``: ``[b, h, q, l]``.

    GQA: query heads are grouped onto KV heads in order (head h uses KV head h // (num_heads // num_kv_heads)).
    Keys at positions > the query's position get probability 0 (``key_pos`` defaults to 0..l-1).
    """
    b, hq, nq, d = query.shape
    hkv, nk = key.shape[1], key.shape[2]
    if hq % hkv:
        raise ValueError(f"num_heads={hq} is not a multiple of num_kv_heads={hkv}")
    scale = d**-0.5 if scale is None else scale
    k = key.float().repeat_interleave(hq // hkv, dim=1)
    logits = torch.matmul(query.float(), k.transpose(-1, -2)) * scale
    if key_pos is None:
        key_pos = torch.arange(nk, device=key.device)
    mask = key_pos.view(1, -1) > query_pos.view(-1, 1).to(key_pos.device)  # [q, l]
    logits = logits.masked_fill(mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


def column_sums(probs: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Sum attention probabilities over query rows and over the query heads of each GQA group."""
    b, hq, nq, nk = probs.shape
    return probs.sum(dim=2).view(b, num_kv_heads, hq // num_kv_heads, nk).sum(dim=2)


def normalizer_counts(query_pos: torch.Tensor, num_tokens: int, normalizer: Normalizer) -> torch.Tensor:
    """N_i of ZC-8 for keys 0..l-1 (float32, at least 1).

    ``causal_count``: l - i (0-indexed, the number of full-attention rows that see key i);
    ``probe_nnz``: the number of query rows at a position >= i.
    """
    i = torch.arange(num_tokens, device=query_pos.device)
    if Normalizer(normalizer) is Normalizer.CAUSAL_COUNT:
        counts = (num_tokens - i).float()
    else:
        counts = (query_pos.view(-1, 1) >= i.view(1, -1)).sum(dim=0).float()
    return counts.clamp_(min=1.0)


def token_saliency(
    query: torch.Tensor,
    key: torch.Tensor,
    saliency: Saliency = Saliency.NORMALIZED,
    normalizer: Normalizer = Normalizer.CAUSAL_COUNT,
    probes: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Per-token saliency ``[b, num_kv_heads, l]`` of a prompt.

    ``probes=None`` uses every query row (the exact ZC-5/ZC-6 on the full matrix); otherwise only the rows at
    the given positions (ZC-7/8). ``query`` holds all l rows; ``key`` l keys.
    """
    l = key.shape[2]
    pos = torch.arange(l, device=query.device) if probes is None else probes.to(query.device)
    probs = attention_probs(query[:, :, pos], key, pos, scale)
    sums = column_sums(probs, key.shape[1])
    if Saliency(saliency) is Saliency.ACCUMULATED:
        return sums
    return sums / normalizer_counts(pos, l, normalizer)


def select_salient(
    scores: torch.Tensor,
    salient_ratio: float,
    selection: Selection = Selection.GLOBAL,
    block_size: int = 128,
) -> torch.Tensor:
    """Boolean salient mask ``[..., l]`` from scores ``[..., l]``.

    ``global``: the top ``ceil(r * l)`` tokens along the last dim (the paper's selection, :func:`salient_count`).
    ``quota``: in each block of ``block_size`` consecutive tokens (the last may be partial, n tokens), the top
    ``quota_count(n, r)``: a multiple of 16 when ``n`` is one (page layout v2), else ``ceil(r * n)``. Ties go
    to the earlier token (stable descending sort): kernels must use the same rule.
    """
    l = scores.shape[-1]
    if Selection(selection) is Selection.GLOBAL:
        return _top_mask(scores, salient_count(l, salient_ratio))
    masks = []
    for start in range(0, l, block_size):
        chunk = scores[..., start : start + block_size]
        masks.append(_top_mask(chunk, quota_count(chunk.shape[-1], salient_ratio)))
    return torch.cat(masks, dim=-1) if masks else torch.zeros_like(scores, dtype=torch.bool)


def _top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    return mask.scatter_(-1, order[..., :k], True)


PROBE_SEED_STRIDE = 1_000_003  # the probe draw of layer i is seeded with probe_seed * stride + i


def probe_seed(config, layer_idx: int) -> int:
    """The seed of layer ``layer_idx``'s probe draw: every cache and the vLLM backend draw the same probes."""
    return config.probe_seed * PROBE_SEED_STRIDE + layer_idx


@functools.lru_cache(maxsize=4096)
def layer_probes(config, num_tokens: int, layer_idx: int) -> torch.Tensor:
    """The probe rows (ZC-7) of a prompt or chunk of ``num_tokens`` tokens in layer ``layer_idx``: the recent
    and random shares of ``config``, drawn with :func:`probe_seed` (cached: every step draws the same rows for
    a chunk length; callers must not modify the tensor)."""
    gen = torch.Generator().manual_seed(probe_seed(config, layer_idx))
    return probe_positions(num_tokens, config.probe_recent, config.probe_random, gen, config.probe_compat)


# block rule ------------------------------------------------------------------------------------------------
def num_block_probes(config, block_size: int) -> int:
    """Probe rows per block of the block rule: ``ceil(probe_recent * N)`` (at least 1) recent plus
    ``round(probe_random * N)`` random (13 of 128 with the 5 % + 5 % presets)."""
    return int(block_probe_offsets(config, block_size, 0).numel())


@functools.lru_cache(maxsize=65536)
def block_probe_offsets(config, block_size: int, block_index: int) -> torch.Tensor:
    """Probe positions inside block ``block_index`` of a sequence (block rule), ascending int64 offsets in
    ``[0, block_size)``: the last ``ceil(probe_recent * N)`` positions (at least 1, so the block's last token
    is always a probe) and ``round(probe_random * N)`` distinct positions before them, drawn with the seed
    ``probe_seed * PROBE_SEED_STRIDE + block_index``. The same in every layer (the decode metadata of a step
    is shared by all layers), and absolute: a function of the position alone, never of a chunk. Cached;
    callers must not modify the tensor."""
    gen = torch.Generator().manual_seed(config.probe_seed * PROBE_SEED_STRIDE + block_index)
    return probe_positions(block_size, config.probe_recent, config.probe_random, gen)


def block_saliency(
    query: torch.Tensor,
    key: torch.Tensor,
    offsets: torch.Tensor,
    normalizer: Normalizer = Normalizer.PROBE_NNZ,
    saliency: Saliency = Saliency.NORMALIZED,
    scale: float | None = None,
) -> torch.Tensor:
    """Scores of complete blocks by their own probes (block rule, ZC-7/8 inside a block), fp32 ``[B, N, H]``.

    Parameters
    ----------
    query : ``[B, P, num_heads, head_size]``, the queries of each block's probe rows, in offset order.
    key : ``[B, N, num_kv_heads, head_size]``, the keys of each block (post-RoPE).
    offsets : int ``[B, P]``, the probe positions in the block (:func:`block_probe_offsets`).
    normalizer : ``probe_nnz`` divides token ``j``'s sum by the probes at or after it; ``causal_count`` by
        ``N - j`` (the block's queries that see it). ``saliency="accumulated"``: the sums (ZC-5).

    Probe ``p`` attends over keys ``0 .. offsets[p]`` of its block (fp32 softmax, block-local causal mask); a
    token's score sums the probabilities it receives over the probes and the query heads of its GQA group.
    Computed in fp32 from the given values; one block's result does not depend on the other blocks of the
    call (every path, chunked or not, batched or not, gets the same bits).
    """
    b, p, hq, d = query.shape
    n, h = key.shape[1], key.shape[2]
    if hq % h:
        raise ValueError(f"num_heads={hq} is not a multiple of num_kv_heads={h}")
    scale = d**-0.5 if scale is None else scale
    g = hq // h
    q = query.float().view(b, p, h, g, d).permute(0, 2, 1, 3, 4).reshape(b * h, p * g, d)
    k = key.float().permute(0, 2, 3, 1).reshape(b * h, d, n)
    logits = torch.bmm(q, k).view(b, h, p, g, n) * scale
    pos = torch.arange(n, device=key.device)
    off = offsets.to(key.device).long()
    seen = pos.view(1, 1, n) <= off.view(b, p, 1)  # [B, P, N]
    logits = logits.masked_fill(~seen.view(b, 1, p, 1, n), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    sums = probs.sum(dim=3).sum(dim=2).transpose(1, 2)  # [B, N, H]
    if Saliency(saliency) is Saliency.ACCUMULATED:
        return sums.contiguous()
    if Normalizer(normalizer) is Normalizer.PROBE_NNZ:
        counts = seen.sum(dim=1).float()  # [B, N]
    else:
        counts = (n - pos).float().expand(b, n)
    return (sums / counts.clamp(min=1.0).unsqueeze(-1)).contiguous()


def random_scores(config, batch: int, num_kv_heads: int, num_tokens: int) -> torch.Tensor:
    """Scores ``[batch, num_kv_heads, num_tokens]`` of the random-saliency ablation for a segment (block) of
    ``num_tokens`` tokens, seeded with ``probe_seed + num_tokens``: every segment of one length gets the same
    draw (as the reference compressor has always drawn them)."""
    gen = torch.Generator().manual_seed(config.probe_seed + num_tokens)
    return torch.rand((batch, num_kv_heads, num_tokens), generator=gen)
