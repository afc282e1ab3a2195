"""The `adaptive` preset served: each layer runs its calibrated salient split, the split is logged at start-up
and on /metrics, pages keep one size (vLLM's KV line equals the `vllm` preset's), and a prompt of several
complete blocks is answered."""

from __future__ import annotations

import re

import pytest

from zipcache_vllm.method.calibration import key_rows


@pytest.fixture(scope="module")
def adaptive(e2e_tmp, start_server):
    args = ("--kv-cache-backend", "zipcache", "--zipcache-config", "adaptive", "--max-num-seqs", "16",
            "--max-num-batched-tokens", "512")
    with start_server(e2e_tmp, *args, name="adaptive") as s:
        yield s


def test_split_is_logged_and_on_metrics(adaptive):
    want = key_rows("adaptive", 30, 3, 64, 128, 128)  # the bundled SmolLM2's calibrated key rows per layer
    line = re.search(r"ZipCache salient rows per layer \(K/V of 128, calibration adaptive\): (.*)", adaptive.log_text())
    assert line, "no per-layer split line in the start-up log"
    logged = [tuple(int(x) for x in item.split(":")[1].split("/")) for item in line.group(1).split()]
    assert logged == [(k, 128 - k) for k in want]
    text = adaptive.get("/metrics")
    for i in (0, len(want) - 1):
        m = re.search(rf'^zipcache:layer_key_salient_rows\{{layer="{i}"\}} ([\d.]+)$', text, re.M)
        assert m and float(m.group(1)) == want[i]


def test_pages_keep_the_vllm_presets_size(adaptive):
    assert re.search(r"ZipCache layout: .* 7424 bytes per \(block, KV head\)", adaptive.log_text())


def test_a_prompt_of_several_blocks_is_answered(adaptive):
    prompt = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(60))  # ~480 tokens
    out = adaptive.client().completions.create(model="smollm2", prompt=prompt + " Item 3 is a", max_tokens=8,
                                               temperature=0)
    assert out.usage.prompt_tokens > 3 * 128
    assert out.choices[0].finish_reason in ("length", "stop") and out.choices[0].text.strip()
