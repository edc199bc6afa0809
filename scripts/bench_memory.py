#!/usr/bin/env python3
"""Peak memory of one real full fine-tune step, measured, next to what ``adamw-lm plan`` predicts.

Builds an mlx-lm Llama from a synthetic config sized by the flags (random bfloat16 weights, nothing
downloaded), trains every block as ``mlx_lm lora --fine-tune-type full --num-layers -1`` does
(embeddings and head frozen), with ``nn.value_and_grad`` over mlx-lm's ``default_loss`` and gradient
checkpointing from ``mlx_lm.tuner.trainer.grad_checkpoint`` (``--no-grad-checkpoint`` turns it off).
Each optimizer runs in its own subprocess: a warm-up step, then ``mx.reset_peak_memory`` and one
measured step evaluated as mlx-lm's trainer does (parameters, state and loss in one ``mx.eval``).

Optimizers: ``mlx`` (mlx-lm's way: ``mlx.optimizers.AdamW``, moments in the weights' bf16) and ours at
each precision ``--optimizers`` names with the default weight update, and ``int4+exact`` (``int4``
with ``weight_update="exact"``).
The plan column is :func:`adamw_lm.memory.plan_from_config` for the same config, batch and sequence
length. Prints a markdown table and a one-line verdict; exits 1 when a prediction is off by more than
``--tolerance`` of the measured peak.

Usage: python scripts/bench_memory.py [--hidden 384] [--layers 4] [--batch-size 2]
                                      [--max-seq-length 128] [--no-grad-checkpoint]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from adamw_lm import AdamW, memory

GB = 1e9


def llama_config(args: argparse.Namespace) -> dict:
    """A Llama ``config.json`` of the flags' size (untied head, as Llama-3-8B)."""
    return {
        "model_type": "llama",
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "intermediate_size": args.intermediate or int(2.6875 * args.hidden),
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": args.vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def optimizers(streams: int | None = None, chunk_size: int | None = None) -> dict:
    """Name -> (state precision for the plan, weight_update for the plan, factory)."""
    made = {"mlx": (None, None, lambda: optim.AdamW(1e-5))}
    for precision in ("fp32", "bf16", "int8", "int4"):
        made[precision] = (
            precision, None,
            lambda p=precision: AdamW(1e-5, state_precision=p, streams=streams, chunk_size=chunk_size),
        )
    made["int4+exact"] = (
        "int4", "exact",
        lambda: AdamW(
            1e-5, state_precision="int4", weight_update="exact", streams=streams,
            chunk_size=chunk_size,
        ),
    )
    return made


def measure(name: str, args: argparse.Namespace) -> dict:
    """One optimizer's step in this process: bytes held before the step and the step's peak."""
    from mlx_lm.tuner.trainer import default_loss, grad_checkpoint

    from adamw_lm.memory import _build_lazy_model

    config = llama_config(args)
    model = _build_lazy_model(config, "synthetic config")
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    model.freeze()
    for layer in model.layers:
        layer.unfreeze()
    if args.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    optimizer = optimizers(args.streams, args.chunk_size)[name][2]()
    tokens = mx.random.randint(0, args.vocab, (args.batch_size, args.max_seq_length + 1),
                               key=mx.random.key(0))
    lengths = mx.array([[0, args.max_seq_length]] * args.batch_size)
    loss_and_grad = nn.value_and_grad(model, default_loss)

    def step() -> None:
        (loss, _), grads = loss_and_grad(model, tokens, lengths)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)

    step()
    mx.clear_cache()
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    state = sum(a.nbytes for _, a in tree_flatten(optimizer.state))
    return {"held": held, "peak": mx.get_peak_memory(), "state": state, "seconds": seconds}


def predicted(name: str, args: argparse.Namespace) -> memory.MemoryRow:
    precision, weight_update, _ = optimizers()[name]
    plan = memory.plan_from_config(
        llama_config(args), fine_tune_type="full", num_layers=-1, precisions=(precision,),
        weight_update=weight_update, batch_size=args.batch_size, chunk_size=args.chunk_size,
        max_seq_length=args.max_seq_length, grad_checkpoint=args.grad_checkpoint,
    )  # fmt: skip
    return plan.rows[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=None, help="default 2.6875 x hidden")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--optimizers", nargs="+", default=["mlx", "bf16", "int8", "int4", "int4+exact"],
                   choices=list(optimizers()))
    p.add_argument("--streams", type=int, default=None, help="our AdamW's streams (default: its own)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="our AdamW's chunk_size (default: its own)")
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return 0
    passed = sys.argv[1:] if argv is None else argv
    if args.hidden % args.heads or args.heads % args.kv_heads or (args.hidden // args.heads) % 2:
        print("bench_memory: --hidden / --heads must be an even head size, and --heads a multiple "
              "of --kv-heads", file=sys.stderr)
        return 2
    config = llama_config(args)
    print(
        f"Llama hidden {args.hidden}, {args.layers} layers, intermediate "
        f"{config['intermediate_size']}, vocab {args.vocab}, bf16 weights; full fine-tune of every "
        f"block; batch {args.batch_size} x {args.max_seq_length} tokens, gradient checkpointing "
        f"{'on' if args.grad_checkpoint else 'off'}; {mx.default_device()}, each optimizer in its "
        "own process.\n"
    )
    print("| optimizer | held before the step | state | measured step peak "
          "| `plan` predicts | plan / measured | step s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    worst = 0.0
    for name in args.optimizers:
        done = subprocess.run(
            [sys.executable, __file__, *passed, "--child", name], capture_output=True, text=True
        )
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            print(f"bench_memory: the {name} step failed: {tail[0]}", file=sys.stderr)
            return 2
        m = json.loads(done.stdout.strip().splitlines()[-1])
        row = predicted(name, args)
        error = row.peak / m["peak"] - 1
        worst = max(worst, abs(error))
        print(f"| {name} | {m['held'] / GB:.3f} GB | {m['state'] / GB:.3f} GB "
              f"| {m['peak'] / GB:.3f} GB | {row.peak / GB:.3f} GB "
              f"| {100 * (1 + error):.1f} % | {m['seconds']:.2f} |")
    ok = worst <= args.tolerance
    print(f"\nVerdict: {'PASS' if ok else 'FAIL'}: plan's largest error is {100 * worst:.1f} % of "
          f"the measured peak (tolerance {100 * args.tolerance:.0f} %).")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
