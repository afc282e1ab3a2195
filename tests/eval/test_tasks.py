"""Synthetic retrieval tasks: determinism, answer placement, lengths, chat template, jsonl round-trip."""

from __future__ import annotations

import re

import pytest

from zipcache_vllm.eval import tasks as T

pytestmark = pytest.mark.model  # needs the bundled model's tokenizer folder


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer(None)


def _user_message(prompt: str) -> str:
    m = re.search(r"<\|im_start\|>user\n(.*)<\|im_end\|>\n<\|im_start\|>assistant\n\Z", prompt, re.S)
    assert m, "user turn not found"
    return m.group(1)


def test_passkey_deterministic_per_seed(tok):
    a = T.make_passkey_tasks(tok, 4, 512, seed=7)
    b = T.make_passkey_tasks(tok, 4, 512, seed=7)
    c = T.make_passkey_tasks(tok, 4, 512, seed=8)
    assert a == b
    assert [t["prompt"] for t in a] != [t["prompt"] for t in c]


def test_fact_deterministic_per_seed(tok):
    a = T.make_fact_tasks(tok, 4, 15, seed=7)
    assert a == T.make_fact_tasks(tok, 4, 15, seed=7)
    assert [t["prompt"] for t in a] != [t["prompt"] for t in T.make_fact_tasks(tok, 4, 15, seed=8)]


@pytest.mark.parametrize(("filler", "context_tokens"),
                         [("simple", 256), ("simple", 512), ("simple", 2048), ("varied", 1024)])
def test_passkey_answer_placement_and_length(tok, filler, context_tokens):
    tasks = T.make_passkey_tasks(tok, 5, context_tokens, seed=0, filler=filler)
    assert [t["depth"] for t in tasks] == [0.0, 0.25, 0.5, 0.75, 1.0]
    positions = []
    for t in tasks:
        prompt, key = t["prompt"], t["answer"]
        assert re.fullmatch(r"[1-9]\d{4}", key)
        needle = T.PASSKEY_NEEDLE.format(key=key)
        assert prompt.count(needle) == 1  # the passkey sentence is inserted exactly once
        assert key not in prompt.replace(needle, "")  # ... and the key occurs nowhere else
        assert prompt.count(T.PASSKEY_QUESTION) == 1
        assert _user_message(prompt).endswith(T.PASSKEY_QUESTION)
        assert t["prompt_tokens"] == T.count_tokens(tok, prompt)
        assert abs(t["prompt_tokens"] - context_tokens) <= 0.1 * context_tokens
        assert t["context_tokens"] == context_tokens and t["filler"] == filler
        haystack = _user_message(prompt).split("\n\n")[1]
        positions.append(haystack.index(needle) / max(1, len(haystack) - len(needle)))
    assert positions[0] == 0.0 and positions[-1] == 1.0
    assert positions == sorted(positions)


def test_passkey_bad_arguments_raise(tok):
    with pytest.raises(ValueError):
        T.make_passkey_tasks(tok, 1, 20)  # shorter than the fixed overhead
    with pytest.raises(ValueError):
        T.make_passkey_tasks(tok, 1, 512, filler="nope")


def test_filler_sentences_are_neutral():
    for sentences in T.FILLERS.values():
        assert len(set(sentences)) == len(sentences) > 1
        for s in sentences:
            assert not re.search(r"\d|pass ?key|register", s, re.I)


@pytest.mark.parametrize("num_lines", [1, 10, 40])
def test_fact_answer_placement(tok, num_lines):
    for t in T.make_fact_tasks(tok, 6, num_lines, seed=1):
        prompt, ans = t["prompt"], t["answer"]
        lines = re.findall(r"^line ([a-z]+-[a-z]+): REGISTER_CONTENT is (\d+)$", prompt, re.M)
        assert len(lines) == num_lines == t["num_lines"]
        assert len({k for k, _ in lines}) == num_lines and len({v for _, v in lines}) == num_lines
        assert lines[t["line_index"]] == (t["line_key"], ans)
        assert prompt.count(ans) == 1  # the answer appears exactly once, in its own line
        assert prompt.count(f"line {t['line_key']}:") == 1
        assert _user_message(prompt).endswith(f"What is the REGISTER_CONTENT in line {t['line_key']}?")
        assert t["prompt_tokens"] == T.count_tokens(tok, prompt)


def test_chat_template_applied(tok):
    for t in T.make_passkey_tasks(tok, 2, 300) + T.make_fact_tasks(tok, 2, 5):
        assert t["prompt"].startswith("<|im_start|>")
        assert t["prompt"].endswith("<|im_start|>assistant\n")
        assert t["prompt"] == T.chat_prompt(tok, _user_message(t["prompt"]))


def test_jsonl_round_trip(tok, tmp_path):
    tasks = T.make_passkey_tasks(tok, 3, 300) + T.make_fact_tasks(tok, 3, 5)
    path = tmp_path / "sub" / "tasks.jsonl"
    T.write_jsonl(tasks, path)
    assert len(path.read_text(encoding="utf-8").splitlines()) == 6
    assert T.read_jsonl(path) == tasks


def test_cli_writes_tasks(tok, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(T, "load_tokenizer", lambda model: seen.append(model) or tok)  # no second load
    out = tmp_path / "fact.jsonl"
    T.main(
        [
            "fact",
            "--n",
            "3",
            "--num-lines",
            "8",
            "--seed",
            "2",
            "--output",
            str(out),
            "--model",
            tok.name_or_path,
        ]
    )
    assert T.read_jsonl(out) == T.make_fact_tasks(tok, 3, 8, seed=2)
    out = tmp_path / "passkey.jsonl"
    T.main(
        ["passkey", "--n", "2", "--context-tokens", "400", "--output", str(out), "--model", tok.name_or_path]
    )
    assert T.read_jsonl(out) == T.make_passkey_tasks(tok, 2, 400, seed=0)
    assert seen == [tok.name_or_path] * 2


def test_is_correct():
    assert T.is_correct("48213", "The pass key is 48213.")
    assert T.is_correct("Paris", "the answer is paris")
    assert not T.is_correct("48213", "The pass key is 4821.")
