"""zipcache-eval on files it has never seen, with the bundled model (tiny settings to stay fast)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from zipcache_vllm.eval.cli import main
from zipcache_vllm.eval.methods import Method

pytestmark = pytest.mark.model

CHAT = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalfiles")
    text = " ".join(f"Sentence number {i} tells that the river {i % 7} flows past mill {i % 11}." for i in range(200))
    (d / "text.txt").write_text(text)
    prompts = [{"prompt": CHAT.format(q=q)} for q in ("Name three fruits.", "What is 2 + 3?")]
    (d / "prompts.jsonl").write_text("\n".join(json.dumps(p) for p in prompts) + "\n")
    filler = "The grass is green. The sky is blue. " * 12
    tasks = [{"prompt": CHAT.format(q=f"{filler}The pass key is {k}. Remember it. {filler}What is the pass key?"),
              "answer": str(k)} for k in (31415, 27182)]
    (d / "tasks.jsonl").write_text("\n".join(json.dumps(t) for t in tasks) + "\n")
    return d


def _run(args, tmp_path):
    out = tmp_path / "out.json"
    main([*args, "--output", str(out)])
    return json.loads(out.read_text())


def test_perplexity(files, tmp_path):
    res = _run(["perplexity", "--text-file", str(files / "text.txt"), "--context-len", "96",
                "--continuation-len", "32", "--max-windows", "1", "--methods", "bf16,zipcache:salient_ratio=0.4"],
               tmp_path)
    r = res["results"]
    assert set(r) == {"bf16", "zipcache:salient_ratio=0.4"}
    for key in ("perplexity", "bytes_per_token", "bits_per_value", "compression_ratio"):
        assert key in r["zipcache:salient_ratio=0.4"]
    assert "paper_ratio" in r["zipcache:salient_ratio=0.4"] and "paper_ratio" not in r["bf16"]
    assert r["zipcache:salient_ratio=0.4"]["settings"]["salient_ratio"] == 0.4
    assert r["bf16"]["compression_ratio"] == 1.0


def test_agreement(files, tmp_path):
    res = _run(["agreement", "--prompts-file", str(files / "prompts.jsonl"), "--max-new-tokens", "6",
                "--methods", "bf16,int2"], tmp_path)
    r = res["results"]
    assert r["bf16"]["agreement"] == 1.0 and r["bf16"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= r["int2"]["agreement"] <= 1.0 and r["int2"]["kl"] >= 0.0


def test_retrieval(files, tmp_path):
    res = _run(["retrieval", "--tasks-file", str(files / "tasks.jsonl"), "--max-new-tokens", "12",
                "--methods", "bf16,kivi2", "--keep-samples"], tmp_path)
    r = res["results"]
    assert r["bf16"]["tasks"] == 2 and 0.0 <= r["bf16"]["accuracy"] <= 1.0
    assert len(r["kivi2"]["samples"]) == 2


def test_sweep_writes_plot(files, tmp_path):
    plot = tmp_path / "sweep.png"
    res = _run(["sweep", "--text-file", str(files / "text.txt"), "--context-len", "96", "--continuation-len", "32",
                "--max-windows", "1", "--ratios", "0.2,1.0", "--families", "zipcache", "--baselines", "bf16",
                "--plot", str(plot)], tmp_path)
    assert set(res["results"]) == {"zipcache:salient_ratio=0.2", "zipcache:salient_ratio=1.0", "bf16"}
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_bad_inputs_fail_clearly(files, tmp_path):
    with pytest.raises(SystemExit, match="unknown method"):
        main(["perplexity", "--text-file", str(files / "text.txt"), "--methods", "zipkache"])
    with pytest.raises(SystemExit, match="no such file"):
        main(["perplexity", "--text-file", str(tmp_path / "missing.txt")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(SystemExit, match="answer"):
        main(["retrieval", "--tasks-file", str(bad)])
    with pytest.raises(ValueError, match="salient_ratio"):
        Method.parse("zipcache:salient_ratio=1.5")


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "zipcache_vllm.eval", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "perplexity" in out.stdout and "sweep" in out.stdout


def test_adaptive_method_gives_each_layer_its_split(tmp_path):
    from types import SimpleNamespace

    from zipcache_vllm.eval.methods import Method

    path = tmp_path / "cal.json"
    path.write_text('{"format": 1, "block_size": 128, "models": {"2x1x64": {"model": "toy", "budgets": '
                    '{"128": {"key_rows": [128, 64]}}}}}')
    mc = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=1, head_dim=64, hidden_size=64,
                         num_attention_heads=1)
    cache = Method.parse(f"zipcache-adaptive:calibration={path}").make_cache(mc)
    rows = [(round(layer.compressor.config.salient_ratio * 128), round(layer.compressor.config.v_salient_ratio * 128))
            for layer in cache.layers]
    assert rows == [(128, 0), (64, 64)]
