"""Initial weights drawn tensor by tensor, so that a rank can build only the part it keeps.

Each parameter is drawn from a generator of its own, seeded by the run's seed and the
parameter's name in the whole GPT, with GPT-2's rule: matrices and embeddings N(0, 0.02), the
residual projections (`c_proj`) N(0, 0.02 / sqrt(2 n_layer)), biases 0, norm gains 1. A value
therefore depends on the seed, the name and the device type only: not on the order modules are
built in, not on tensor parallelism (a shard is cut from its whole tensor) and not on the
pipeline stage that holds it. Megatron-LM draws per partition on the GPU (its weights change with
the tensor-parallel size) unless asked to draw whole tensors on the CPU; torchtitan builds on
the meta device and initialises the shards. This builds on the meta device too and keeps
Megatron's layout-independent values, drawn on the rank's own device rather than the CPU.

A launcher builds the model under `torch.device("meta")` (no memory), cuts it, and calls
`materialize`, which gives each parameter still on meta its storage and value, one at a time.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

INIT_STD = 0.02
"""GPT-2's standard deviation for matrices and embeddings."""


def parameter_seed(seed: int, name: str) -> int:
    """The seed of parameter `name`'s generator: a hash of the run's seed and the name."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def initial_value(
    name: str, shape: torch.Size, n_layer: int, seed: int, device: torch.device
) -> torch.Tensor:
    """The whole parameter `name` (its name in GPT's state dict) in fp32 on `device`."""
    if len(shape) == 1:  # biases and norm gains (LayerNorm's and RMSNorm's)
        fill = 0.0 if name.endswith("bias") else 1.0
        return torch.full(shape, fill, device=device)
    std = INIT_STD
    if name.endswith("c_proj.weight"):  # GPT-2: one scaled projection per residual add
        std /= math.sqrt(2 * n_layer)
    generator = torch.Generator(device=device).manual_seed(parameter_seed(seed, name))
    return torch.empty(shape, device=device).normal_(0.0, std, generator=generator)


def stored_value(
    state: Mapping[str, Any], name: str, shape: torch.Size, device: torch.device | None
) -> torch.Tensor:
    """`state[name]` (a tensor, or a lazy one with `.contiguous()`, as a checkpoint reader
    gives) in fp32 on `device`, checked against the model's shape for it."""
    if name not in state:
        raise ValueError(f"the weights have no {name} (the model's is {tuple(shape)})")
    tensor = state[name].contiguous().to(device=device, dtype=torch.float32)
    if tensor.shape != shape:
        raise ValueError(
            f"the weights' {name} is {tuple(tensor.shape)}, the model's {tuple(shape)}"
        )
    return tensor


Value = Callable[[str, nn.Parameter], torch.Tensor]
"""(the parameter's name in the whole model, the meta parameter) -> its value on the device."""


class Materializer:
    """Gives the parameters still on the meta device their storage and values, module by module.

    Called on a module, every meta parameter in it becomes a real one holding
    `value(names[id(p)], p)`; the Parameter objects are replaced (their attributes, such as the
    tensor-parallel marks, copied over). A parameter shared by two modules (tied embeddings)
    is made once and stays shared, also across calls; modules outside the one called that hold
    the same submodules see the new parameters."""

    def __init__(self, names: dict[int, str], value: Value) -> None:
        self.names, self.value = names, value
        self.made: dict[int, nn.Parameter] = {}
        self.replaced: list[nn.Parameter] = []  # kept alive: `made` and `names` key on their ids

    def __call__(self, module: nn.Module) -> None:
        with torch.no_grad():
            for sub in module.modules():
                for key, param in list(sub._parameters.items()):
                    if param is not None and param.is_meta:
                        sub._parameters[key] = self._made(param)

    def _made(self, param: nn.Parameter) -> nn.Parameter:
        if id(param) not in self.made:
            data = self.value(self.names[id(param)], param)
            new = nn.Parameter(data, requires_grad=param.requires_grad)
            new.__dict__.update(param.__dict__)
            self.made[id(param)] = new
            self.replaced.append(param)
        return self.made[id(param)]


def parameter_names(module: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name in `module` (a tied parameter: its first name)."""
    return {id(p): name for name, p in module.named_parameters()}
