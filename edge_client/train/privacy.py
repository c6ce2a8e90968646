"""Noise on what the device sends up (issue 16, the DP-Forward idea): each token row clipped to an
L2 norm C, plus Gaussian noise N(0, (sigma·C)²) on every coordinate.

Two tensors of a split step can be inverted by the cloud, and each gets its own knob:
- `inputs`: the StepBegin tensor (B, T, E), the input embeddings (or the hidden state after the
  device-side blocks): the nearest row of the public embedding table gives the tokens back.
  `--privacy-noise SIGMA --privacy-clip C`.
- `hidden_grad`: the HiddenGrad (B, T, H) = dL/dh the device sends after its head and loss: through
  the public head it gives the labels back, which for a causal LM are the text.
  `--grad-noise SIGMA --grad-clip C`. The cloud backpropagates this tensor, so its noise changes
  the LoRA gradients: that is the accuracy price being measured.

Padding rows (attention mask 0) are left exactly as they are: they hold no text (the pad token's
public embedding; a zero gradient, since padding has no label), the mask itself goes up unnoised
anyway, and noise there would only add noise to training. Every other row is clipped and noised,
prompt rows of the gradient included (their gradient is zero; unnoised, they would show which
positions are the prompt). `--grad-noise-rows loss` trades that away: only the rows that carry a
loss are clipped and noised, the others go up as the exact zeros they are. The cloud then sees
which positions are answers (their count and place, not their content: those rows get the same
noise), and training gets far less noise, since the cloud backpropagates every noised row through
every block into the LoRA gradients and prompt rows are most of a sequence.

What it guarantees. Clipping bounds every row's norm by C, so replacing what one row encodes (one
token's embedding; one position's label in the gradient) moves that row by at most 2C in L2. Adding
N(0, (sigma·C)²) per coordinate is then the Gaussian mechanism with L2 sensitivity Δ = 2C and noise
scale σ_abs = sigma·C. By the classical bound (Dwork & Roth, Theorem A.1: σ_abs ≥ sqrt(2 ln(1.25/δ))·Δ/ε
suffices for ε in (0, 1)), one noised row is (ε, δ)-DP with respect to that row's content for

    ε = sqrt(2 ln(1.25/δ)) · 2 / sigma,   valid only where this ε < 1.

At δ = 1e-5 that is ε = 9.69 / sigma, so the bound says something only for sigma > 9.69 (sigma = 10:
ε ≈ 0.97). Below that the classical bound does not apply at all (the analytic Gaussian mechanism of
Balle & Wang 2018 gives an ε for any sigma; it is not computed here). Everything the cloud does
with a noised tensor afterwards is post-processing and weakens nothing.

What it does not guarantee.
- Not a whole sequence, nor a whole run: privacy losses add up (basic composition: k releases give
  (k·ε, k·δ)). With no device-side blocks a token goes up in one input row and as the label of one
  gradient row per epoch: 2 releases per token per epoch (both knobs on), 2·T per sequence of T
  tokens. With device-side blocks (--edge-layers) row t depends on every token up to t, so one token
  is in every later row of its sequence.
- Not across epochs: every epoch's step (steps are numbered over the whole run) draws fresh noise,
  so the cloud gets E independent noisy copies of the same text and can average them (σ shrinks as
  1/sqrt(E)); that is the composition above, not a loophole, but it means sigma must be chosen for
  the whole run. A step redone in the same process (after UNAVAILABLE) draws the same noise again
  and so releases nothing new; one redone after a resume from a checkpoint with a fresh secret does.
- Not the lengths: the attention mask goes up as it is.
- Not the other tensor: input noise says nothing about the labels in the gradient, and gradient
  noise nothing about the inputs. With both on and no device-side blocks, what else the device
  sends (LoRA deltas and dL/dx in `layerwise`, the weights in `adapter`, Kill-and-Revive reports) is
  computed from tensors the cloud sent, the LoRA weights and device randomness; the weights are
  trained on gradients computed from the noised tensors, so it is post-processing too.
- Not a cryptographic guarantee: the noise comes from torch's generator (mt19937 on the CPU, Philox
  on CUDA) seeded with a 63-bit key, in floating point; the proofs assume true real-valued Gaussian
  draws. The key must stay secret: whoever knows it regenerates the noise and subtracts it. It is
  derived from `--noise-seed` (never the run's `--seed`, which the adapter protocol sends to the
  cloud for dropout), or from a fresh random secret per process when that flag is not given.

Reproducibility: the noise of one tensor is keyed by (secret, step, micro-batch, which tensor), so
a run with a fixed --noise-seed is reproducible, and a device and a cloud of one kind draw alike
(as common/lora_math.py's dropout masks; a CPU and a GPU do not).
"""

from __future__ import annotations

import hashlib
import secrets
import struct

import torch

from common.config import GRAD_NOISE_ROWS, GradNoiseRows, TrainConfig
from common.errors import ConfigError
from edge_client.train.data import loss_rows

NOISED_TENSORS: tuple[str, ...] = ("inputs", "hidden_grad")  # the key's `which`: index in this tuple


def noise_key(secret: int, step: int, micro_batch: int, which: int) -> int:
    """The generator seed of one tensor's noise: blake2b of the four integers, personalised so that no
    key here equals a dropout mask's key (common/lora_math.py)."""
    raw = struct.pack("<4Q", secret, step, micro_batch, which)
    digest = hashlib.blake2b(raw, digest_size=8, person=b"dlora-noise").digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def clip_rows(x: torch.Tensor, clip: float) -> torch.Tensor:
    """x * min(1, clip / ||row||) for every row of the last dimension; differentiable in x."""
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (..., 1)
    return x * (clip / norms.clamp_min(clip))  # a row already within clip: times exactly 1


def clip_and_noise(x: torch.Tensor, mask: torch.Tensor, sigma: float, clip: float | None, key: int) -> torch.Tensor:
    """Rows of x (B, T, D) where mask (B, T) is non-zero: clipped to `clip`, plus N(0, (sigma·clip)²) drawn
    from a generator seeded with key; rows where mask is 0: x's own. Differentiable in x (the noise
    is additive). sigma 0 and clip None: x itself, the same tensor object; clip and sigma 0: clipping only.

    Raises:
        ConfigError: sigma > 0 without a clip norm (the noise is scaled to it).
    """
    if clip is None:
        if sigma == 0:
            return x
        raise ConfigError(f"noise sigma {sigma:g} needs a clip norm: the noise's scale is sigma x the clip")
    y = clip_rows(x, clip)
    if sigma > 0:
        gen = torch.Generator(device=x.device).manual_seed(key)
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32)  # float32 draws, any dtype
        y = y + (noise * (sigma * clip)).to(x.dtype)
    return torch.where(mask.to(device=x.device, dtype=torch.bool).unsqueeze(-1), y, x)  # (B, T, D)


class PrivacyNoise:
    """The run's two noise defences: `inputs` on the StepBegin tensor, `hidden_grad` on dL/dh."""

    def __init__(
        self,
        secret: int,
        inputs: tuple[float, float | None] = (0.0, None),
        hidden_grad: tuple[float, float | None] = (0.0, None),
        grad_rows: GradNoiseRows = "all",
    ) -> None:
        """secret: keys the noise (keep it from the cloud); inputs, hidden_grad: (sigma, clip norm or None);
        grad_rows: "all" real rows of dL/dh, or only the "loss" rows."""
        if grad_rows not in GRAD_NOISE_ROWS:
            raise ConfigError(f"--grad-noise-rows={grad_rows!r}: use {' or '.join(GRAD_NOISE_ROWS)}")
        self.secret = secret
        self.knobs = {"inputs": inputs, "hidden_grad": hidden_grad}
        self.grad_rows = grad_rows

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> PrivacyNoise:
        """--privacy-noise/--privacy-clip, --grad-noise/--grad-clip/--grad-noise-rows; the secret from
        --noise-seed, else fresh."""
        secret = cfg.noise_seed if cfg.noise_seed is not None else secrets.randbits(63)
        return cls(secret, (cfg.privacy_noise, cfg.privacy_clip), (cfg.grad_noise, cfg.grad_clip),
                   cfg.grad_noise_rows)

    def _apply(self, which: str, x: torch.Tensor, mask: torch.Tensor, step: int, micro_batch: int) -> torch.Tensor:
        sigma, clip = self.knobs[which]
        return clip_and_noise(
            x, mask, sigma, clip, noise_key(self.secret, step, micro_batch, NOISED_TENSORS.index(which))
        )

    def inputs(self, x: torch.Tensor, mask: torch.Tensor, step: int, micro_batch: int) -> torch.Tensor:
        """The StepBegin tensor (b, t, E) as it goes up; mask (b, t) is the micro-batch's attention mask."""
        return self._apply("inputs", x, mask, step, micro_batch)

    def hidden_grad(
        self, g: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, step: int, micro_batch: int
    ) -> torch.Tensor:
        """The HiddenGrad dL/dh (b, t, H) as it goes up; mask (b, t) the attention mask, labels (b, t) the
        micro-batch's labels (IGNORE where no loss), which pick the rows under --grad-noise-rows loss."""
        rows = loss_rows(labels).to(mask.device) & mask.bool() if self.grad_rows == "loss" else mask
        return self._apply("hidden_grad", g, rows, step, micro_batch)

