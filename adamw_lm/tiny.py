"""Offline, deterministic tiny Llama models for tests and quick quality runs.

:func:`build_tiny_model` writes a complete Hugging Face-style model directory
(``config.json``, ``model.safetensors``, tokenizer files) that the unmodified
``mlx_lm.load`` loads and ``mlx_lm.generate`` / ``mlx_lm.lora`` run, without
touching the network:

* the weights come from ``mlx_lm.models.llama.Model`` re-initialised from
  ``mx.random.key(seed)`` (so parameter names are exactly what mlx-lm expects);
* the tokenizer is a byte-level BPE trained on the spot with the ``tokenizers``
  library on ``adamw_lm/data/tiny_corpus.txt``, which ships as package data so
  this works from an installed wheel too.

The same ``size`` and ``seed`` give byte-identical files, so a test can compare
checksums and a run directory can name its model by ``(size, seed)``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "TINY_SIZES",
    "CHAT_TEMPLATE",
    "build_tiny_model",
    "tiny_config",
    "num_parameters",
]

# Architecture knobs per size. Everything else in config.json is shared (see
# tiny_config). vocab_size is also the tokenizer's trained size: the shipped
# corpus supports up to about 1600 tokens, so keep it below that.
TINY_SIZES: dict[str, dict[str, int]] = {
    # ~107k parameters: unit tests.
    "small": {
        "vocab_size": 512,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
    },
    # ~1.3M parameters: quality runs (loss curves, optimizer comparisons).
    "medium": {
        "vocab_size": 1024,
        "hidden_size": 128,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 384,
    },
}

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Order fixes the ids: <s>=0, </s>=1, <pad>=2, roles 3..5.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS)

# Every message ends in eos and nothing follows it: generation stops after the
# assistant turn, a training sequence ends in eos, and messages[:-1] plus the
# generation prompt renders to a token prefix of the full conversation
# (mlx-lm's mask_prompt relies on that).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

CORPUS_FILE = "tiny_corpus.txt"
MAX_POSITION_EMBEDDINGS = 1024
_DTYPES = ("float32", "bfloat16", "float16")


def _check_size(size: str) -> dict[str, int]:
    if size not in TINY_SIZES:
        raise ValueError(
            f"unknown tiny model size {size!r}; allowed sizes: {', '.join(sorted(TINY_SIZES))}"
        )
    return TINY_SIZES[size]


def tiny_config(size: str = "small", dtype: str = "float32") -> dict[str, Any]:
    """Return the ``config.json`` contents (an HF ``LlamaConfig``) for ``size``."""
    arch = _check_size(size)
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        "head_dim": arch["hidden_size"] // arch["num_attention_heads"],
        "hidden_act": "silu",
        # The std the embedding was drawn with (see _init_weights).
        "initializer_range": round(arch["hidden_size"] ** -0.5, 6),
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "mlp_bias": False,
        "model_type": "llama",
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        # Tied like Llama 3.2 1B/3B: at this scale an untied head would be
        # ~30% of all parameters.
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "use_cache": True,
        **arch,
    }


def _make_model(config: dict[str, Any]):
    # Imported lazily: reading TINY_SIZES should not pay for importing mlx-lm.
    from mlx_lm.models.llama import Model, ModelArgs

    return Model(ModelArgs.from_dict(config))


def num_parameters(size: str = "small") -> int:
    """Total parameter count of the ``size`` model (tied embedding counted once)."""
    from mlx.utils import tree_flatten

    model = _make_model(tiny_config(size))
    # Parameters are lazy here, so only shapes are read; nothing is computed.
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def _init_weights(config: dict[str, Any], seed: int, dtype: str) -> dict[str, Any]:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    model = _make_model(config)
    shapes = {name: p.shape for name, p in tree_flatten(model.parameters())}
    names = sorted(shapes)
    # One explicit key per tensor, assigned in sorted-name order: independent
    # of module construction order and of mlx's global PRNG state.
    keys = mx.random.split(mx.random.key(seed), len(names))
    weights = {}
    for i, name in enumerate(names):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            w = mx.ones(shape, dtype=mx.float32)
        else:
            # std = 1/sqrt(fan_in) for linears (input dim is last) and
            # 1/sqrt(hidden) for the embedding: unit-RMS activations and unit
            # embedding rows. HF's fixed 0.02 suits width ~2048; at width 64 it
            # leaves the tied head with logits of std ~0.16, and mlx-lm's
            # "full" fine-tune freezes the embedding and final norm, so the
            # loss could hardly move (measured: 6.2 -> 5.9 vs 6.7 -> 3.9 val
            # loss in 150 steps on recipes/data).
            std = shape[-1] ** -0.5
            w = std * mx.random.normal(shape, mx.float32, key=keys[i])
        weights[name] = w.astype(getattr(mx, dtype))
    mx.eval(weights)
    return weights


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = resources.files("adamw_lm").joinpath("data", CORPUS_FILE).read_text("utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # A "ByteLevel" decoder is what makes mlx-lm pick its BPE streaming detokenizer.
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes, so any input text encodes even if the corpus lacks it.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # BPE training is deterministic (ties broken by pair order), checked by the
    # byte-identity test across processes.
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"tokenizer corpus only supports {tok.get_vocab_size()} tokens, "
            f"size asks for vocab_size={vocab_size}"
        )
    bos_id = SPECIAL_TOKENS.index(BOS_TOKEN)
    # Llama-style: encode() prepends bos. Same template transformers itself
    # builds from add_bos_token=True, so both agree.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tok


def _tokenizer_config() -> dict[str, Any]:
    return {
        # Explicit generic class, so AutoTokenizer takes tokenizer.json as
        # written instead of picking a class from config.json's model_type
        # (a Llama class assumes SentencePiece conventions).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "chat_template": CHAT_TEMPLATE,
    }


def _write_text(path: Path, text: str) -> None:
    # Bytes, not write_text: no platform newline translation, so checksums match.
    path.write_bytes(text.encode("utf-8"))


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def build_tiny_model(
    out_dir: str | Path,
    size: str = "small",
    seed: int = 0,
    *,
    dtype: str = "float32",
) -> Path:
    """Write a tiny Llama model directory loadable by ``mlx_lm.load`` and return its path.

    Args:
        out_dir: directory to create (parents too); existing model files are overwritten.
        size: a key of :data:`TINY_SIZES`.
        seed: weight-init seed; the tokenizer does not depend on it.
        dtype: weight dtype, one of ``float32``, ``bfloat16``, ``float16``.

    Raises:
        ValueError: unknown ``size`` or ``dtype``.
    """
    import mlx.core as mx

    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(_DTYPES)}")
    config = tiny_config(size, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = _train_tokenizer(config["vocab_size"])
    weights = _init_weights(config, seed, dtype)

    _write_json(out / "config.json", config)
    # Sorted insertion so the safetensors header never depends on dict order.
    mx.save_safetensors(
        str(out / "model.safetensors"),
        {k: weights[k] for k in sorted(weights)},
        metadata={"format": "mlx"},
    )
    _write_text(out / "tokenizer.json", tok.to_str(pretty=True) + "\n")
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    _write_json(
        out / "special_tokens_map.json",
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN},
    )
    return out
