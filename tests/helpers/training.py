"""A few deterministic language-model steps on random tokens, for optimizer and checkpoint tests."""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load_model

#: The LoRA settings of the tests' adapters.
LORA = {"rank": 4, "scale": 10.0, "dropout": 0.0}


def lora_model(model_path: Path, rank: int = 4, num_layers: int = 2) -> nn.Module:
    """The model at ``model_path``, frozen, with LoRA layers on its last ``num_layers`` blocks."""
    model, _ = load_model(model_path)
    model.freeze()
    linear_to_lora_layers(model, num_layers, {**LORA, "rank": rank})
    return model


def lm_steps(model: nn.Module, optimizer: optim.Optimizer, count: int, first: int = 0) -> list[float]:
    """Train ``count`` steps; step ``i``'s tokens depend only on ``i`` (``first`` is the first), so a
    resumed model given the same ``first`` sees the batches an uninterrupted one would."""

    def loss_fn(model, tokens):
        return nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).mean()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    losses = []
    for i in range(first, first + count):
        tokens = mx.random.randint(0, 512, (2, 12), key=mx.random.key(100 + i))
        loss, grads = loss_and_grad(model, tokens)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        losses.append(loss.item())
    return losses
