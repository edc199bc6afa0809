"""Every shipped recipe is a valid config, and the plan numbers in its header are what `plan` says."""

import re
import shlex
from pathlib import Path

import pytest

from adamw_lm import memory
from adamw_lm.cli import build_parser, plan_options
from adamw_lm.config import load_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert "tiny-lora.yaml" in names and len(names) >= 5


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid_and_its_plan_comment_is_true(recipe):
    config = load_config(recipe)
    assert config.optimizer.state_precision in (None, "fp32", "bf16", "int8", "int4")
    text = recipe.read_text()
    command = re.search(r"^# (adamw-lm plan .*)$", text, re.M)
    if recipe.name == "tiny-lora.yaml":
        return
    assert command, f"{recipe.name}: no `adamw-lm plan` line in its header"
    args = build_parser().parse_args(shlex.split(command.group(1))[1:])
    precisions = memory.DEFAULT_PRECISIONS
    if args.precision:
        precisions = tuple(None if p.lower() == "none" else p for p in args.precision)
    plan = memory.plan_from_config(
        Path(__file__).resolve().parents[1] / args.model, precisions=precisions, **plan_options(args)
    )
    assert f"{plan.trainable_parameters:,} trainable" in text
    assert config.fine_tune_type == args.fine_tune_type
    if config.fine_tune_type != "full":
        assert config.lora_parameters["rank"] == args.rank
    if args.memory is None:
        return
    # A recipe that claims to fit a Mac: its plan line is its own batch, sequence length,
    # checkpointing, layers and weight update, and the quoted step peak is what plan computes.
    assert (args.batch_size, args.max_seq_length, args.grad_checkpoint, args.num_layers) == (
        config.batch_size, config.max_seq_length, config.grad_checkpoint, config.num_layers
    )
    assert args.weight_update in (None, config.optimizer.weight_update)
    precision = config.optimizer.state_precision
    row = plan.row(precision)
    peak = f"{row.peak / 1e9:.2f} GB"
    assert f"step peak: {precision} {peak}, fits a {args.memory:g} GB Mac" in text
    assert row.peak <= memory.metal_limit_bytes(args.memory)
    assert f"{memory.metal_limit_bytes(args.memory) / 1e9:.2f} GB" in text
    assert f"activations {max(row.activations, row.recompute) / 1e9:.2f} GB" in text
    assert f"{precision} {row.state / 1e9:.2f} GB" in text
