"""Token saliency (method doc §5-6): accumulated (ZC-5) and normalized (ZC-6) attention, probes (ZC-7/8).

Shapes: ``query [b, num_heads, q, head_size]`` and ``key [b, num_kv_heads, l, head_size]`` (post-RoPE);
scores come back per KV head, ``[b, num_kv_heads, l]``, the query heads of a GQA group summed (as the
released code does).
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


def chunk_counts(normalizer: Normalizer, context_len: int, query_len: int, tail_len: int,
                 probes: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """ZC-8 counts contributed by one chunk: how many of its ``query_len`` queries (``causal_count``) or of its
    probe rows (offsets ``probes``, ``probe_nnz``) see each key from ``context_len - tail_len`` (the staged
    tail) to ``context_len + query_len - 1`` (the chunk's own tokens). fp32 ``[tail_len + query_len]``; a
    decode row (``query_len`` 1, probe 0) gives 1 to every key."""
    pos = torch.arange(context_len - tail_len, context_len + query_len)
    if Normalizer(normalizer) is Normalizer.PROBE_NNZ:
        return ((context_len + probes.long().cpu()).view(-1, 1) >= pos.view(1, -1)).sum(0).float()
    return (context_len + query_len - torch.clamp(pos, min=context_len)).float()


def random_scores(config, batch: int, num_kv_heads: int, num_tokens: int) -> torch.Tensor:
    """Scores ``[batch, num_kv_heads, num_tokens]`` of the random-saliency ablation for a segment (block) of
    ``num_tokens`` tokens, seeded with ``probe_seed + num_tokens``: every segment of one length gets the same
    draw (as the reference compressor has always drawn them)."""
    gen = torch.Generator().manual_seed(config.probe_seed + num_tokens)
    return torch.rand((batch, num_kv_heads, num_tokens), generator=gen)
