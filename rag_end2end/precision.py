"""The numerics rules every part of the toolkit follows, in one place:

- Models load in float32 (`LOAD_DTYPE`), whatever dtype a checkpoint's config.json declares (transformers 5
  loads in that dtype by default, and most hub generators declare bf16). Mixed precision is Lightning's job
  (`--precision bf16-mixed / 16-mixed`): it needs float32 master weights. With fp16 or bf16 weights, 16-mixed
  fails at the first step ("Attempting to unscale FP16 gradients") and AdamW's small bf16 updates round away.
- Retrieval scores (doc scores q.d, InfoNCE's q.p) are float32 products made outside autocast
  (`float32_scores`): autocast recasts a float32 einsum or matmul to bf16, which moves DPR-sized scores
  (~80) in steps of 0.5 and quantises p(z|x) and its gradient.
- bf16 is chosen only where the GPU computes it natively (`native_bf16`): torch's `is_bf16_supported()` also
  says yes on pre-Ampere cards (V100, T4), which only emulate it, at a fraction of fp16's speed.
"""

from __future__ import annotations

import torch

LOAD_DTYPE = torch.float32


def native_bf16() -> bool:
    """The current CUDA device computes in bfloat16 natively (compute capability 8.0 and later, or ROCm);
    False without CUDA and on cards that would only emulate it."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def float32_scores(equation: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.einsum(equation, a, b) in float32 with autocast off on the operands' device, so that scores keep
    float32 precision under bf16-mixed / 16-mixed training (a plain `.float()` does not: autocast recasts the
    product). Differentiable like the einsum itself."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        return torch.einsum(equation, a.float(), b.float())
