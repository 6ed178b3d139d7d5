"""Small Flax models with a Dense block under a lifted transform, shared by the GPTQ-moment and
bias-correction tests."""

import flax.linen as nn


class Block(nn.Module):
    """A residual Dense block; returns ``(carry, None)`` under ``nn.scan``."""

    scan: bool = False

    @nn.compact
    def __call__(self, x, _=None):
        y = nn.relu(nn.Dense(x.shape[-1], name="dense")(x)) + x
        return (y, None) if self.scan else y


class Lifted(nn.Module):
    """``inp`` (``width`` outputs, ReLU if ``relu``) and ``out`` (``outputs``) Dense layers around
    ``blk``, a block under a Flax lifted transform: ``kind`` "plain" (none), "remat", "loop" (one
    block applied three times), "scan_shared" (a scan broadcasting its parameters: what "loop"
    does), "scan" (three blocks, kernels stacked (3, width, width)) or "vmap" (one block per batch
    element, kernels stacked (batch, width, width))."""

    kind: str
    width: int = 6
    outputs: int = 3
    relu: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.width, name="inp")(x)
        x = nn.relu(x) if self.relu else x
        if self.kind == "plain":
            x = Block(name="blk")(x)
        elif self.kind == "remat":
            x = nn.remat(Block)(name="blk")(x)
        elif self.kind == "loop":
            blk = Block(name="blk")
            for _ in range(3):
                x = blk(x)
        elif self.kind == "scan_shared":
            x, _ = nn.scan(Block, variable_broadcast="params", split_rngs={"params": False},
                           length=3)(scan=True, name="blk")(x, None)
        elif self.kind == "scan":
            x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                           length=3)(scan=True, name="blk")(x, None)
        else:  # "vmap"
            x = nn.vmap(Block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0)(name="blk")(x)
        return nn.Dense(self.outputs, name="out")(x)
