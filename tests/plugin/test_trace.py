"""plugin/trace.py: attention traces written per layer call, read back by position, and the first divergence
between two runs located and classified (inputs differ: outside the attention; only the output: the attention)."""

from types import SimpleNamespace

import pytest
import torch

from zipcache_vllm.plugin import envs, trace


def _run(folder, batches, layers=3, touch=None):
    """Write the traces of ``batches`` (each a list of (context_len, query_len) per sequence) over ``layers``;
    every row's tensors are a function of (layer, position) alone, except where ``touch(layer, pos, name)``
    says to change one."""
    for qsl_ctx in batches:
        lens = [ql for _, ql in qsl_ctx]
        step = SimpleNamespace(query_start=[0, *torch.tensor(lens).cumsum(0).tolist()], query_lens=lens,
                               context_lens=[c for c, _ in qsl_ctx])
        for layer in range(layers):
            rows = {name: [] for name in ("query", "key", "value", "out")}
            for ctx, ql in qsl_ctx:
                for p in range(ctx, ctx + ql):
                    for i, name in enumerate(rows):
                        x = torch.full((2, 4), float(layer * 1000 + p * 10 + i)).bfloat16()
                        if touch is not None and touch(layer, p, name):
                            x[1, 3] = -x[1, 3]
                        rows[name].append(x)
            trace.write(str(folder), layer, step, *(torch.stack(rows[n]) for n in rows))


def test_first_divergence_finds_and_classifies(tmp_path):
    solo = tmp_path / "solo"
    solo.mkdir()
    _run(solo, [[(0, 5)], [(5, 1)], [(6, 1)]])
    ref = trace.read(solo)
    assert sorted(ref) == [(layer, p) for layer in range(3) for p in range(7)]
    for name, touch, want in (
        ("equal", None, None),
        ("input", lambda layer, p, n: layer == 1 and p == 6 and n == "key", ("outside attention", 6, 1)),
        ("output", lambda layer, p, n: layer >= 2 and p >= 5 and n == "out", ("attention", 5, 2)),
    ):
        other = tmp_path / name
        other.mkdir()
        # three copies, staggered: prefills in one step, then decode rows of different positions together
        _run(other, [[(0, 5), (0, 5)], [(5, 1), (5, 1), (0, 5)], [(6, 1), (6, 1), (5, 1)], [(6, 1)]], touch=touch)
        got = trace.first_divergence(ref, trace.read(other))
        if want is None:
            assert got is None
            continue
        where, position, layer = want
        assert (got["where"], got["position"], got["layer"]) == want
        assert set(got["differ"]) == ({"key"} if where == "outside attention" else {"out"})
        assert got["differ"][next(iter(got["differ"]))] > 0


def test_trace_dir_must_exist(monkeypatch, tmp_path):
    monkeypatch.delenv(envs.TRACE_DIR, raising=False)
    assert envs.trace_dir() is None
    monkeypatch.setenv(envs.TRACE_DIR, str(tmp_path))
    assert envs.trace_dir() == str(tmp_path)
    monkeypatch.setenv(envs.TRACE_DIR, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="is not a directory"):
        envs.trace_dir()
