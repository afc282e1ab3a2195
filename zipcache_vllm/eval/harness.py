"""Accuracy measurements of compressed KV caches on a real model (no vLLM).

Every measurement holds a context in the method's cache and scores what follows:

* :func:`perplexity` - a continuation scored (teacher-forced, one forward pass) with the context compressed;
* :func:`agreement` - greedy bf16 continuations replayed step by step through the method's cache: top-1
  agreement and mean KL(bf16 || method) of the next-token distributions;
* :func:`retrieval` - greedy answer generated with the prompt compressed; correct if the answer appears.

Bytes are read from the cache right after the prompt's prefill (the state in which the rest is computed).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..hf import cache as hf_cache
from ..models import resolve_model
from .methods import Method


@dataclass
class Model:
    model: torch.nn.Module
    tokenizer: object
    path: str

    @property
    def config(self):
        return self.model.config

    @property
    def kv_channels(self) -> int:
        c = self.config
        head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return c.num_key_value_heads * head

    @property
    def bf16_bytes_per_token(self) -> int:
        """bf16 K+V bytes per token over all layers (SmolLM2: 30 x 192 x 2 x 2 = 23,040)."""
        return self.config.num_hidden_layers * self.kv_channels * 2 * 2


def load_model(model: str | None = None, dtype: str = "float32") -> Model:
    """Load a causal LM (default: the bundled SmolLM2, converted on first use) with the zipcache attention."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model, dtype if dtype in ("bfloat16", "float32") else "float32")
    tok = AutoTokenizer.from_pretrained(path)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                             attn_implementation=hf_cache.ATTN_IMPLEMENTATION)
    m.eval()
    return Model(m, tok, path)


@dataclass
class Bytes:
    """Accumulates stored bytes over samples."""

    total: int = 0
    tokens: int = 0
    samples: int = 0
    parts: dict = field(default_factory=dict)

    def add(self, nb: dict, tokens: int) -> None:
        self.samples += 1
        self.total += nb["total"]
        self.tokens += tokens
        for k, v in nb.items():
            self.parts[k] = self.parts.get(k, 0) + v

    def figures(self, m: Model, method: Method) -> dict:
        bpt = self.total / max(self.tokens, 1)
        values = self.tokens * m.config.num_hidden_layers * m.kv_channels * 2
        out = {
            "bytes_per_token": round(bpt, 2),
            "bits_per_value": round(self.total * 8 / max(values, 1), 4),
            "compression_ratio": round(m.bf16_bytes_per_token / bpt, 4) if bpt else None,
            "bytes_breakdown_per_token": {k: round(v / max(self.tokens, 1), 2) for k, v in self.parts.items()},
        }
        if method.is_zipcache:
            mean_tokens = round(self.tokens / max(self.samples, 1))
            out["paper_ratio"] = round(method.paper_ratio(mean_tokens, m.kv_channels), 4)
        return out


@torch.inference_mode()
def _forward(m: Model, ids: torch.Tensor, cache) -> torch.Tensor:
    return m.model(input_ids=ids, past_key_values=cache, use_cache=True).logits


@torch.inference_mode()
def perplexity(m: Model, method: Method, windows: list[torch.Tensor], context_len: int, desc: str = "") -> dict:
    """Perplexity of ``windows[i][context_len:]`` with ``windows[i][:context_len]`` held in the method's cache."""
    nll, count, nbytes = 0.0, 0, Bytes()
    for w in tqdm(windows, desc=desc or method.spec, leave=False):
        ids = w.view(1, -1)
        cache = method.make_cache(m.config)
        ctx_logits = _forward(m, ids[:, :context_len], cache)
        nbytes.add(cache.nbytes(), context_len)
        cont = ids[:, context_len:]
        logits = torch.cat([ctx_logits[:, -1:], _forward(m, cont[:, :-1], cache)], dim=1)
        nll += F.cross_entropy(logits[0].float(), cont[0], reduction="sum").item()
        count += cont.shape[1]
    return {"perplexity": round(math.exp(nll / count), 4), "nll": round(nll / count, 5), "tokens_scored": count,
            **nbytes.figures(m, method)}


@torch.inference_mode()
def decode_steps(m: Model, prompt: torch.Tensor, cache, steps: int, forced: torch.Tensor | None = None):
    """Prefill ``prompt`` then ``steps`` decode steps; greedy unless ``forced`` tokens are given.

    Returns (tokens [steps], logits [steps, vocab] float32, bytes stored right after the prefill);
    logits[i] predicts tokens[i].
    """
    logits = _forward(m, prompt.view(1, -1), cache)[0, -1:]
    prefill_bytes = cache.nbytes()
    toks, outs = [], []
    eos = m.tokenizer.eos_token_id
    for i in range(steps):
        outs.append(logits[0].float())
        t = int(forced[i]) if forced is not None else int(logits[0].argmax())
        toks.append(t)
        if i + 1 == steps or (forced is None and t == eos):
            break
        logits = _forward(m, torch.tensor([[t]]), cache)[0, -1:]
    return torch.tensor(toks), torch.stack(outs), prefill_bytes


@torch.inference_mode()
def agreement(m: Model, method: Method, prompts: list[torch.Tensor], references: list, desc: str = "") -> dict:
    """Teacher-forced replay of the bf16 greedy ``references`` [(tokens, logits)] through the method's cache."""
    agree, kl, n, nbytes = 0, 0.0, 0, Bytes()
    for p, (ref_toks, ref_logits) in tqdm(list(zip(prompts, references, strict=True)), desc=desc or method.spec,
                                          leave=False):
        cache = method.make_cache(m.config)
        toks, logits, nb = decode_steps(m, p, cache, len(ref_toks), forced=ref_toks)
        nbytes.add(nb, len(p))
        agree += (logits.argmax(-1) == ref_toks).sum().item()
        lp_ref, lp = F.log_softmax(ref_logits, -1), F.log_softmax(logits, -1)
        kl += (lp_ref.exp() * (lp_ref - lp)).sum(-1).sum().item()
        n += len(ref_toks)
    return {"agreement": round(agree / n, 4), "kl": round(kl / n, 5), "tokens_compared": n,
            **nbytes.figures(m, method)}


@torch.inference_mode()
def references(m: Model, prompts: list[torch.Tensor], steps: int, desc: str = "bf16 reference") -> list:
    ref = Method.parse("bf16")
    return [decode_steps(m, p, ref.make_cache(m.config), steps)[:2] for p in tqdm(prompts, desc=desc, leave=False)]


@torch.inference_mode()
def retrieval(m: Model, method: Method, tasks: list[dict], max_new_tokens: int = 20, desc: str = "") -> dict:
    """Accuracy: the answer appears (case-insensitive) in the first ``max_new_tokens`` greedy tokens."""
    correct, nbytes, samples = 0, Bytes(), []
    for t in tqdm(tasks, desc=desc or method.spec, leave=False):
        ids = m.tokenizer(t["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        cache = method.make_cache(m.config)
        toks, _, nb = decode_steps(m, ids, cache, max_new_tokens)
        text = m.tokenizer.decode(toks, skip_special_tokens=True)
        ok = str(t["answer"]).lower() in text.lower()
        correct += ok
        samples.append({"answer": t["answer"], "output": text, "correct": ok})
        nbytes.add(nb, len(ids))
    return {"accuracy": round(correct / len(tasks), 4), "tasks": len(tasks), **nbytes.figures(m, method),
            "samples": samples}


def text_windows(m: Model, text: str, context_len: int, continuation_len: int, max_windows: int) -> list:
    """Disjoint token windows of ``context_len + continuation_len`` from ``text``."""
    ids = m.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    size = context_len + continuation_len
    n = min(max_windows, len(ids) // size)
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {size}")
    return [ids[i * size : (i + 1) * size] for i in range(n)]
