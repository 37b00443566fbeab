"""Mixed precision with float32 master weights: a bfloat16 working copy for the passes (lesson 07, section 7).

Autocast (``fit(bf16=True)``) keeps the weights in float32 and casts them to bfloat16 inside every forward pass:
on a small network whose step is recorded as a CUDA graph, those casts are a good part of what is left of the
step. The older recipe of Micikevicius et al. (2018, "Mixed precision training") keeps two copies instead:

* a **working copy** in bfloat16, which the forward and backward passes use (no weight casts, half the memory
  traffic, bfloat16 gradients);
* the **master weights** in float32, which AdamW and the EMA update: a step of lr·update is often below
  bfloat16's resolution (8 bits of mantissa, a relative step of 2⁻⁸ ≈ 0.4%), so accumulating the updates in
  bfloat16 itself would lose most of them.

Each step copies the working gradients up into the master gradients (float32), lets the optimiser step the
master weights, and copies the master weights down into the working copy (rounded to bfloat16). Every layer of
the copy that holds weights casts its floating-point inputs to bfloat16 first (a forward pre-hook), so that the
float32 tensors a network makes for itself (a sinusoidal time embedding, say) meet bfloat16 weights; unlike
autocast, normalisations then run in bfloat16 too.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class Bfloat16Weights:
    """A bfloat16 working copy of ``master`` (a float32 network) and the two copies between them.

    ``working`` is what the loss calls; its output is returned in float32. After ``loss.backward()``:
    :meth:`gradients_to_master`, then the optimiser's step on ``master``'s parameters, then
    :meth:`weights_from_master`. The master network is left untouched otherwise: it is the trained model.
    """

    def __init__(self, master: nn.Module) -> None:
        if not isinstance(master, nn.Module):
            raise ValueError(f"master must be an nn.Module, got {type(master).__name__}")
        wrong = sorted({str(p.dtype) for p in master.parameters() if p.dtype != torch.float32})
        if wrong:
            raise ValueError(f"master must hold float32 parameters (the master weights), found {wrong}")
        self.master = master
        self.working = copy.deepcopy(master).to(torch.bfloat16)
        for module in self.working.modules():
            if next(module.parameters(recurse=False), None) is not None:  # a layer with weights of its own
                module.register_forward_pre_hook(_inputs_to_bfloat16)
        self.working.register_forward_hook(_output_to_float32)
        self._master_params = list(master.parameters())
        self._working_params = list(self.working.parameters())

    def gradients_to_master(self) -> None:
        """master.grad ← working.grad in float32 (zero where a parameter got no gradient this step).

        The master gradients are allocated once and then written in place, so that a recorded CUDA graph and
        the optimiser always find them at the same addresses.
        """
        for master, working in zip(self._master_params, self._working_params, strict=True):
            if master.grad is None:
                master.grad = torch.zeros_like(master)
            if working.grad is None:
                master.grad.zero_()
        pairs = [(m.grad, w.grad) for m, w in zip(self._master_params, self._working_params, strict=True)
                 if w.grad is not None]
        if pairs:
            torch._foreach_copy_([m for m, _ in pairs], [w for _, w in pairs])  # one fused call, not one per tensor

    @torch.no_grad()
    def weights_from_master(self) -> None:
        """working ← master rounded to bfloat16; the working copy's buffers (running statistics, if any) go up."""
        torch._foreach_copy_(self._working_params, self._master_params)
        for master_buffer, working_buffer in zip(self.master.buffers(), self.working.buffers(), strict=True):
            master_buffer.copy_(working_buffer)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the working copy's gradients (the master gradients are overwritten by the next copy)."""
        self.working.zero_grad(set_to_none=set_to_none)


def _inputs_to_bfloat16(module: nn.Module, inputs: tuple) -> tuple:
    """Forward pre-hook: a layer's floating-point positional inputs, cast to bfloat16 (integer inputs kept)."""
    return tuple(x.to(torch.bfloat16) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                 for x in inputs)


def _output_to_float32(module: nn.Module, inputs: tuple, output: object) -> object:
    """Forward hook: a bfloat16 network's tensor output, returned in float32 (losses are computed in float32)."""
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return output.float()
    return output


def bfloat16_copy(model: nn.Module) -> nn.Module:
    """A bfloat16 copy of a trained float32 network for sampling: float32 in, float32 out (lesson 07, section 7).

    Sampling 1,000 digits is limited by memory traffic, not launches; autocast (``graphed(model, bf16=True)``)
    still reads the float32 weights and casts them in every call, while this copy holds them in bfloat16 once.
    It rounds the weights to 8 bits of mantissa (a relative error of up to 2⁻⁹ per weight) and runs the
    normalisations in bfloat16 too, so its samples differ from the float32 network's by bfloat16 noise. The copy is
    frozen, in eval mode; ``model`` is untouched.

    >>> fast = graphed(bfloat16_copy(ema_model))   # one graph replay per call, on bfloat16 weights
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module (a trained float32 network), got {type(model).__name__}")
    return Bfloat16Weights(model).working.eval().requires_grad_(False)
