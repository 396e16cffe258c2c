"""The invariant model: invariant-guided fusion with sequential variation regularization (Xu, Song,
Xue, Liu, Wang, Zhang, arXiv 2409.00143; built from its v1 code, "SATI").

Each modality is encoded (text projected; audio and vision through a one-layer Transformer over
the raw features, then projected), split per step into a private code (its own encoder) and a
shared code (one encoder for every modality). An adversarial modality discriminator behind a
gradient reversal layer, with an additive-margin cosine classifier, and a CMD loss between the
shared codes of every pair make the shared space modality-invariant; a decoder reconstructs the
projected sequence from private + shared. Fusion: the query modality's private stream (text, or
the first available modality without text) cross-attends to every other private stream; a gate
computed from the pair's shared (invariant) codes scales each cross-modal stream before its
residual; the streams are concatenated per step, pass a one-layer Transformer, are averaged over
the real steps and mapped to the prediction. The sequential variation regularizer penalises the
divergence between the feature distributions of consecutive steps of every modality with more
than one step.

Reconstruction choices ([R]: where the paper and code leave a choice open) and fixes to the
released code, one line each:
- [fix] the released gate is hard (sign of tanh, 0 or 1) and has zero gradient, so its layers never train; here it is sigmoid(linear(FBP(...))).
- [fix] the released code reuses the audio-text gate layer for the vision-text stream (its own layer is never used); here every stream has its own gate.
- [R] the released gate pools aligned sequences step by step; the data here is unaligned, so the gate of query step t reads FBP(shared_query[t], masked mean of the other modality's shared codes).
- [R] without text the query modality is the first available of audio, vision; each other modality gives one stream.
- [R] the audio/vision Transformer has one head (raw sizes such as 73 are prime), no positional encoding, as released.
- [R] sinusoidal positions are added to the private streams before cross-attention and to nothing else, as released.
- [R] the discriminator sees only the shared codes (the released code also feeds private codes through the reversal, which would make them invariant too).
- [R] classifier: cosine logits between the normalised discriminator feature and normalised class weights, margin subtracted from the true class, scaled (as released: cos - m, not ArcFace's cos(theta + m)); no extra L2 on the weights.
- [R] CMD (5 moments) on the masked time means of the shared codes, averaged over pairs (as released); the codes are sigmoid outputs, so the bounded-support scale is 1.
- [R] reconstruction: a linear decoder of private + shared per real step, MSE to the projected sequence detached (so the projection cannot shrink to lower it).
- [R] sequential variation: per modality with more than one step, softmax over the [private; shared] features of each step, averaged over the samples whose steps t and t+1 are both real; `jsd` (as released), `l1` or `l2` between consecutive steps; averaged over step pairs, then modalities.
- [R] classification uses cross-entropy with the same head producing C logits.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from msa.models.base import ModelOutput, check_model_config
from msa.models.layers import GradientReversal, length_mask, masked_mean, sinusoidal_positions
from msa.platform.core.errors import MsaError
from msa.platform.core.spec import DataSpec

DIVERGENCES = ("jsd", "l1", "l2")


@dataclass
class InvariantConfig:
    """Hyperparameters of the invariant model.

    Args:
        d: width of the projected sequences and the private/shared codes.
        heads: heads of the cross-attention and fusion Transformer; must divide d.
        dropout: dropout in the encoders, attention, fusion and head.
        fbp_hidden, fbp_k: factorised bilinear pooling of the gate (output size, factors per output).
        grl_strength: the gradient reversal layer's scale (lambda).
        angular_scale, angular_margin: the discriminator's cosine classifier (s, m).
        divergence: sequential variation divergence: jsd, l1 or l2.
        w_adv, w_cmd, w_recon, w_seqvar: loss weights (0 switches the term off).
    """

    d: int = 128
    heads: int = 4
    dropout: float = 0.1
    fbp_hidden: int = 32
    fbp_k: int = 2
    grl_strength: float = 1.0
    angular_scale: float = 30.0
    angular_margin: float = 0.5
    divergence: str = "jsd"
    w_adv: float = 0.4
    w_cmd: float = 1.0
    w_recon: float = 1.0
    w_seqvar: float = 1.0

    def __post_init__(self) -> None:
        check_model_config(self, "invariant")
        if self.divergence not in DIVERGENCES:
            raise MsaError(f"invariant: divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        if self.fbp_hidden < 1 or self.fbp_k < 1:
            raise MsaError(f"invariant: fbp_hidden and fbp_k must be >= 1, got {self.fbp_hidden}, {self.fbp_k}")
        if self.grl_strength < 0:
            raise MsaError(f"invariant: grl_strength must be >= 0, got {self.grl_strength}")


class ModalityEncoder(nn.Module):
    """Text: Linear -> ReLU -> LayerNorm. Audio/vision: a one-layer, one-head Transformer over the
    raw features first."""

    def __init__(self, dim: int, d: int, dropout: float, contextual: bool):
        super().__init__()
        self.context = (nn.TransformerEncoder(nn.TransformerEncoderLayer(dim, 1, 2 * dim, dropout, batch_first=True),
                                              1, enable_nested_tensor=False) if contextual else None)
        self.project = nn.Sequential(nn.Linear(dim, d), nn.ReLU(), nn.LayerNorm(d))

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        if self.context is not None:
            x = self.context(x, src_key_padding_mask=pad)
        return self.project(x)


class FactorisedBilinearGate(nn.Module):
    """Gate in (0, 1) per query step from FBP(shared query step, pooled shared key codes)."""

    def __init__(self, d: int, hidden: int, k: int, dropout: float):
        super().__init__()
        self.query, self.key = nn.Linear(d, hidden * k, bias=False), nn.Linear(d, hidden * k, bias=False)
        self.dropout, self.k = nn.Dropout(dropout), k
        self.out = nn.Linear(hidden, 1)

    def forward(self, shared_query: torch.Tensor, shared_key: torch.Tensor) -> torch.Tensor:
        """shared_query ``(B, T, d)``, shared_key ``(B, d)`` -> gate ``(B, T, 1)``."""
        joint = self.dropout(self.query(shared_query) * self.key(shared_key).unsqueeze(1))  # (B, T, hidden*k)
        pooled = joint.unflatten(-1, (-1, self.k)).sum(-1)  # sum pooling over each factor group: (B, T, hidden)
        return torch.sigmoid(self.out(F.normalize(pooled, dim=-1)))


class InvariantModel(nn.Module):
    """Encoders -> private/shared codes (adversarial + CMD + recon) -> invariant-gated cross-attention
    from the query modality -> Transformer -> masked mean -> head."""

    def __init__(self, spec: DataSpec, config: InvariantConfig):
        super().__init__()
        self.spec, self.config = spec, config
        c, modalities = config, spec.modalities
        self.classification = spec.task == "classification"
        self.query = "text" if "text" in modalities else modalities[0]
        self.others = [m for m in modalities if m != self.query]
        self.encoders = nn.ModuleDict({m: ModalityEncoder(spec.dims[m], c.d, c.dropout, contextual=m != "text")
                                       for m in modalities})
        self.private = nn.ModuleDict({m: nn.Sequential(nn.Linear(c.d, c.d), nn.Sigmoid()) for m in modalities})
        self.shared = nn.Sequential(nn.Linear(c.d, c.d), nn.Sigmoid())
        self.decoders = nn.ModuleDict({m: nn.Linear(c.d, c.d) for m in modalities})
        self.reverse = GradientReversal(c.grl_strength)
        self.discriminator = nn.Sequential(nn.Linear(c.d, c.d), nn.ReLU(), nn.Dropout(c.dropout))
        self.class_weights = nn.Parameter(torch.randn(len(modalities), c.d) * 0.02)
        self.cross = nn.ModuleDict({m: nn.MultiheadAttention(c.d, c.heads, dropout=c.dropout, batch_first=True)
                                    for m in self.others})
        self.gates = nn.ModuleDict({m: FactorisedBilinearGate(c.d, c.fbp_hidden, c.fbp_k, c.dropout) for m in self.others})
        self.stream_norms = nn.ModuleDict({m: nn.LayerNorm(c.d) for m in self.others})
        fused = c.d * len(self.others)
        self.fusion = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(fused, c.heads, 2 * fused, c.dropout, batch_first=True), 1,
            enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(fused, c.d), nn.Dropout(c.dropout), nn.ReLU(), nn.Linear(c.d, spec.output_size))
        self.loss_weights = {"adv": c.w_adv, "cmd": c.w_cmd, "recon": c.w_recon, "seqvar": c.w_seqvar}

    def forward(self, features: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor],
                labels: torch.Tensor | None = None) -> ModelOutput:
        c, modalities = self.config, self.spec.modalities
        real = {m: length_mask(lengths[m].clamp(min=1), features[m].shape[1]) for m in modalities}  # length 0 reads step 0
        projected, private, shared, shared_mean = {}, {}, {}, {}
        for m in modalities:
            projected[m] = self.encoders[m](features[m], ~real[m])  # (B, T_m, d)
            private[m], shared[m] = self.private[m](projected[m]), self.shared(projected[m])
            shared_mean[m] = masked_mean(shared[m], lengths[m].clamp(min=1))  # (B, d)

        query = private[self.query] + sinusoidal_positions(private[self.query])
        streams = []
        for m in self.others:
            key = private[m] + sinusoidal_positions(private[m])
            attended = self.cross[m](query, key, key, key_padding_mask=~real[m], need_weights=False)[0]
            gate = self.gates[m](shared[self.query], shared_mean[m])  # (B, T_q, 1)
            streams.append(self.stream_norms[m](attended * gate + query))
        fused_steps = self.fusion(torch.cat(streams, dim=-1), src_key_padding_mask=~real[self.query])
        fused = masked_mean(fused_steps, lengths[self.query].clamp(min=1))  # (B, (M-1)*d)
        out = self.head(fused)
        prediction = out if self.classification else out.squeeze(-1)

        weights, aux = self.loss_weights, {}
        if weights["adv"] > 0:
            aux["adv"] = self._adversarial_loss(shared_mean)
        if weights["cmd"] > 0:
            aux["cmd"] = torch.stack([central_moment_discrepancy(shared_mean[m], shared_mean[n])
                                      for m, n in itertools.combinations(modalities, 2)]).mean()
        if weights["recon"] > 0:
            aux["recon"] = torch.stack([self._recon_loss(m, projected[m], private[m], shared[m], real[m])
                                        for m in modalities]).mean()
        if weights["seqvar"] > 0:
            terms = [sequential_variation(torch.cat([private[m], shared[m]], -1), real[m], c.divergence)
                     for m in modalities if features[m].shape[1] > 1]
            if terms:
                aux["seqvar"] = torch.stack(terms).mean()
        return ModelOutput(prediction=prediction, fused=fused, aux_losses=aux)

    def _adversarial_loss(self, shared_mean: dict[str, torch.Tensor]) -> torch.Tensor:
        """Which modality did each time-averaged shared code come from? Additive-margin cosine
        classifier behind the gradient reversal: the discriminator learns it, the shared encoder
        (reversed gradient) learns to make it impossible."""
        c = self.config
        codes = torch.cat([shared_mean[m] for m in self.spec.modalities])  # (M*B, d)
        targets = torch.arange(len(self.spec.modalities), device=codes.device).repeat_interleave(len(codes) // len(shared_mean))
        feature = F.normalize(self.discriminator(self.reverse(codes)), dim=-1)
        cosine = feature @ F.normalize(self.class_weights, dim=-1).T  # (M*B, M)
        logits = c.angular_scale * (cosine - c.angular_margin * F.one_hot(targets, cosine.shape[1]))
        return F.cross_entropy(logits.float(), targets)

    def _recon_loss(self, m: str, projected: torch.Tensor, private: torch.Tensor, shared: torch.Tensor,
                    real: torch.Tensor) -> torch.Tensor:
        error = (self.decoders[m](private + shared) - projected.detach()).pow(2).mean(-1)  # (B, T)
        return (error * real).sum() / real.sum()


def central_moment_discrepancy(x: torch.Tensor, y: torch.Tensor, moments: int = 5) -> torch.Tensor:
    """CMD (Zellinger et al., 2017) between two ``(N, d)`` samples with support in [0, 1]: the
    distance of the means plus the distances of the central moments 2..`moments`."""
    mean_x, mean_y = x.mean(0), y.mean(0)
    total = (mean_x - mean_y).norm()
    centred_x, centred_y = x - mean_x, y - mean_y
    for k in range(2, moments + 1):
        total = total + (centred_x.pow(k).mean(0) - centred_y.pow(k).mean(0)).norm()
    return total


def sequential_variation(x: torch.Tensor, real: torch.Tensor, divergence: str) -> torch.Tensor:
    """Divergence between the feature distributions of consecutive steps of ``x: (B, T, f)``.

    Each step's distribution is the softmax over features averaged over the samples whose steps t
    and t+1 are both real (padding never enters); step pairs with no such sample are skipped."""
    probabilities = x.float().softmax(-1)  # (B, T, f)
    both = (real[:, :-1] & real[:, 1:]).float()  # (B, T-1)
    count = both.sum(0)  # (T-1,)
    used = count > 0
    if not used.any():
        return x.sum() * 0.0
    weights = both[:, used] / count[used]  # (B, P)
    p = torch.einsum("bp,bpf->pf", weights, probabilities[:, :-1][:, used])
    q = torch.einsum("bp,bpf->pf", weights, probabilities[:, 1:][:, used])
    if divergence == "l1":
        per_pair = (p - q).abs().sum(-1)
    elif divergence == "l2":
        per_pair = (p - q).pow(2).sum(-1)
    else:
        middle = (p + q) / 2
        per_pair = 0.5 * (F.kl_div(middle.log(), p, reduction="none").sum(-1)
                          + F.kl_div(middle.log(), q, reduction="none").sum(-1))
    return per_pair.mean()
