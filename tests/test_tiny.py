"""The offline tiny model (adamw_lm.tiny) and the shipped data sets."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from adamw_lm.tiny import TINY_SIZES, build_tiny_model, num_parameters, tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAM_RANGES = {"small": (80_000, 130_000), "medium": (1_000_000, 2_000_000)}


def _digests(model_dir: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(model_dir.iterdir())
    }


@pytest.fixture(scope="module")
def loaded(tiny_model_path):
    import mlx_lm

    return mlx_lm.load(str(tiny_model_path))


def test_writes_expected_files(tiny_model_path):
    assert sorted(p.name for p in tiny_model_path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((tiny_model_path / "config.json").read_text())
    assert config == tiny_config("small")
    assert config["model_type"] == "llama"
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA


def test_load_and_generate(loaded):
    import mlx_lm

    model, tokenizer = loaded
    text = mlx_lm.generate(model, tokenizer, prompt="The capital of France is", max_tokens=8)
    assert isinstance(text, str)

    responses = list(
        mlx_lm.stream_generate(model, tokenizer, prompt="What is 2 plus 3?", max_tokens=8)
    )
    assert 1 <= responses[-1].generation_tokens <= 8
    assert all(0 <= r.token < TINY_SIZES["small"]["vocab_size"] for r in responses)


def test_tokenizer_through_mlx_lm(loaded, tiny_model_path):
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

    _, tok = loaded
    config = tiny_config("small")
    assert tok.bos_token_id == config["bos_token_id"]
    assert tok.eos_token_id == config["eos_token_id"]
    assert tok.eos_token_ids == {config["eos_token_id"]}
    assert len(tok.get_vocab()) == config["vocab_size"]
    assert isinstance(tok.detokenizer, BPEStreamingDetokenizer)

    text = "Water boils at 100 degrees Celsius. Ünïcode too!"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id  # Llama-style bos on encode
    assert tok.decode(ids, skip_special_tokens=True) == text

    assert tok.has_chat_template
    msgs = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "4."},
    ]
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert rendered == (
        "<s><|system|>\nAnswer briefly.</s><|user|>\nWhat is 2 plus 2?</s>"
        "<|assistant|>\n4.</s>"
    )
    full = tok.apply_chat_template(msgs, return_dict=False)
    prompt = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, return_dict=False)
    assert full[: len(prompt)] == prompt  # what mlx-lm's mask_prompt assumes
    assert full.count(tok.bos_token_id) == 1


def test_deterministic_across_builds_and_processes(tmp_path, tiny_model_path):
    reference = _digests(tiny_model_path)
    again = _digests(build_tiny_model(tmp_path / "again", "small", seed=0))
    assert again == reference

    # Another process with another hash seed: catches set/dict-order leaks.
    code = (
        "import sys; from adamw_lm.tiny import build_tiny_model; "
        "build_tiny_model(sys.argv[1], 'small', seed=0)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "proc")], env=env, check=True)
    assert _digests(tmp_path / "proc") == reference

    other = _digests(build_tiny_model(tmp_path / "seed1", "small", seed=1))
    assert other["model.safetensors"] != reference["model.safetensors"]
    # The seed only drives the weights.
    assert {k: v for k, v in other.items() if k != "model.safetensors"} == {
        k: v for k, v in reference.items() if k != "model.safetensors"
    }


def test_weights_differ_by_seed_and_match_init(tiny_model_path, tmp_path):
    import mlx.core as mx

    w0 = mx.load(str(tiny_model_path / "model.safetensors"))
    w1 = mx.load(str(build_tiny_model(tmp_path, "small", seed=1) / "model.safetensors"))
    assert w0.keys() == w1.keys()
    emb = "model.embed_tokens.weight"
    assert not mx.array_equal(w0[emb], w1[emb])
    assert all(v.dtype == mx.float32 for v in w0.values())
    assert mx.array_equal(w0["model.norm.weight"], mx.ones_like(w0["model.norm.weight"]))
    # Distinct tensors get distinct keys (no two q_proj layers alike).
    q = [w0[f"model.layers.{i}.self_attn.q_proj.weight"] for i in range(2)]
    assert not mx.array_equal(q[0], q[1])


@pytest.mark.parametrize("size", sorted(TINY_SIZES))
def test_parameter_counts(size):
    lo, hi = PARAM_RANGES[size]
    assert lo <= num_parameters(size) <= hi


def test_built_model_matches_count(loaded):
    from mlx.utils import tree_flatten

    model, _ = loaded
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == num_parameters("small")


@pytest.mark.parametrize(
    "subdir, kind, counts",
    [
        ("", "TextDataset", (400, 60, 60)),
        ("chat", "ChatDataset", (100, 20, 20)),
        ("completions", "CompletionsDataset", (100, 20, 20)),
    ],
)
def test_load_dataset_like_mlx_lm_lora(loaded, data_dir, subdir, kind, counts):
    from mlx_lm.lora import CONFIG_DEFAULTS
    from mlx_lm.tuner.datasets import load_dataset

    _, tok = loaded
    # mlx_lm.lora builds its args namespace from CONFIG_DEFAULTS plus the CLI.
    args = types.SimpleNamespace(
        **{**CONFIG_DEFAULTS, "data": str(data_dir / subdir), "train": True, "test": True,
           "mask_prompt": subdir != ""}
    )
    splits = load_dataset(args, tok)
    assert tuple(len(s) for s in splits) == counts
    vocab = TINY_SIZES["small"]["vocab_size"]
    for split in splits:
        assert type(split).__name__ == kind
        for i in range(len(split)):
            ids, offset = split.process(split[i])
            assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
            assert max(ids) < vocab
            assert 0 <= offset < len(ids) and (offset > 0) == (subdir != "")


def test_shipped_data_matches_generator():
    script = REPO_ROOT / "scripts" / "make_data.py"
    spec = importlib.util.spec_from_file_location("make_data", script)
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    built = make_data.build()
    stale = [str(p) for p, content in built.items() if p.read_text(encoding="utf-8") != content]
    assert not stale, "run scripts/make_data.py"


@pytest.mark.parametrize("call", [build_tiny_model, num_parameters, tiny_config])
def test_unknown_size(call, tmp_path):
    args = (tmp_path, "huge") if call is build_tiny_model else ("huge",)
    with pytest.raises(ValueError, match="'huge'.*medium, small"):
        call(*args)
    assert not any(tmp_path.iterdir())


def test_unknown_dtype(tmp_path):
    with pytest.raises(ValueError, match="float32"):
        build_tiny_model(tmp_path / "m", dtype="int8")
