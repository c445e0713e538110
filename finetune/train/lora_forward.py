"""A leaner forward for plain LoRA layers while training on CPU: the same sum, fewer full-size tensors.

peft's LoRA forward on a 4-bit base computes `result = base(x).clone(); result = result + lora_B(lora_A(x)) *
scaling`: a defensive copy of the base output, then a scaling and an addition over the full (tokens x out)
output, and in backward one more full-size multiplication for the scaling. On a CPU those memory-bound
elementwise passes cost about as much as the matmuls they follow. Profiled on the demo step (SmolLM2-135M nf4,
one 2,048-token row, bf16, AMX Xeon, 2 cores) the scalings and additions on the [2016 x 1536] gate/up outputs
alone were 3.0 + 3.3 ms per module and pass, against 4.2 ms for the base matmul itself.

`lean_lora_forward` computes the same `base(x) + (lora_A(x) * scaling) @ lora_B^T` with the scaling applied to the
(tokens x r) intermediate and the addition fused into the matmul (`torch.addmm`); no copy is needed because
nothing is changed in place. Only plain LoRA takes this path (one active adapter, no dropout, no DoRA or other
variant, no LoRA bias, not merged, no per-row adapter names); every other call goes to peft's forward unchanged.
The value differs from peft's by bf16 rounding only (the scaling is applied before the product instead of after);
tests/train/test_lora_forward.py compares outputs and gradients.
"""
from __future__ import annotations

import contextlib
import types

_ORIGINAL = "_finetune_peft_forward"


def _plain_adapter(layer, x) -> str | None:
    """The one adapter a call may take the lean path with, else None."""
    import torch

    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity) or layer.lora_B[name].bias is not None:
        return None
    weight = layer.lora_A[name].weight
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return None  # peft would cast the input; leave that to it
    return name


def _forward(self, x, *args, **kwargs):
    import torch
    import torch.nn.functional as F

    name = None if (args or kwargs) else _plain_adapter(self, x)
    if name is None:
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    result = self.base_layer(x)
    h = F.linear(x, self.lora_A[name].weight) * self.scaling[name]
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B[name].weight.t())
    return out.view(result.shape).to(result.dtype)  # as peft's sum: the base output's dtype


def lora_layers(model) -> list:
    import torch
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules()
            if isinstance(m, LoraLayer) and hasattr(m, "base_layer") and isinstance(m.lora_A, torch.nn.ModuleDict)]


@contextlib.contextmanager
def lean_lora_forward(model, active: bool = True):
    """Within the block every LoRA layer of `model` runs `_forward` (peft's own forward restored afterwards);
    yields how many layers it covers."""
    layers = lora_layers(model) if active else []
    own = {id(layer): vars(layer).get("forward") for layer in layers}  # a forward set on the instance, if any
    for layer in layers:
        setattr(layer, _ORIGINAL, layer.forward)
        layer.forward = types.MethodType(_forward, layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            delattr(layer, _ORIGINAL)
            if own[id(layer)] is None:
                del layer.forward
            else:
                layer.forward = own[id(layer)]
