"""DBR: dual-branch rebalancing (arXiv 2604.25179; only the abstract is available) on a DMD/DLF
decoupling stage, with its three modules TSF, AGPR and BRF reconstructed from the abstract.

Decoupling stage: each modality is projected by a Conv1d, then split into a private code (its own
Transformer encoder) and a shared code (one Transformer encoder for every modality); a decoder
reconstructs the projection from [private; shared]. Both codes are then pooled into `segments`
time segments per modality (masked adaptive average pooling), so unaligned modalities of any
length, 1 included, meet on a common grid.
- TSF (shared branch): a temporal path (depth-wise convolution over the segments, per modality)
  and a structural path (attention across the modality tokens of each segment) merged by a
  learned gate g * temporal + (1 - g) * structural, with an optional decorrelation loss.
- AGPR (private branch): learnable anchors per modality; each private stream borrows from the
  others through cross-attention, weighted by a router built from anchor similarity and capped
  by `alpha_max` in total; an anchor contrastive loss keeps a modality's private codes near its
  own anchors and away from the others'.
- BRF: bidirectional cross-attention between the branches (private <- shared and shared <-
  private), each gated by a context vector pooled from both; the pooled branches and the context
  go through an MLP to the prediction (one score, or C logits).
With `use_tsf`, `use_agpr`, `use_brf` false the model is the plain decoupling baseline: shared and
private segments pooled, concatenated and mapped to the prediction.

From DMD/DLF ([C]), one line each:
- [C] Conv1d projection of each modality to d; per-modality private Transformer encoders and ONE shared Transformer encoder, with sinusoidal positions (MulT-style encoders as in DLF).
- [C] decoder of [private; shared] back to the projection (reconstruction MSE); self-regression: the private encoder applied to the reconstruction must give the private code again (DLF's L_s).
- [C] orthogonality: the cosine between the private and shared codes of each step, penalised above 0 (DLF's CosineEmbeddingLoss with target -1).
- [C] margin: DMD's hinge loss on the pooled shared codes of every modality: same-label codes closer (cosine) than different-label ones by 0.15 x the label distance.
- [C] default weights follow DLF's 0.1 * (recon + selfreg + 0.1 * (margin + ortho)).
Reconstructed ([R]), one line each:
- [R] padded steps are zeroed before the Conv1d ("same" padding), so they never reach a real step.
- [R] the reconstruction target is the projection detached (the projection cannot shrink to lower it); DLF flattens codes over time for its margin loss, here they are masked time means (lengths vary).
- [R] segment pooling: segment s of a length-L row averages steps [floor(sL/S), max(floor(sL/S)+1, ceil((s+1)L/S))); a length-1 modality repeats its one step.
- [R] TSF temporal path: depth-wise Conv1d (kernel `tsf_kernel`) + GELU over the segments of each modality; structural path: one multi-head attention across the M modality tokens of each segment, with modality embeddings.
- [R] TSF gate: sigmoid(Linear([temporal; structural])) per feature; decorrelation loss: mean squared cross-correlation between the batch-standardised pooled temporal and structural features.
- [R] AGPR router: affinity(m, n) = max over n's anchors of the cosine to m's pooled private code; weights = softmax over sources n != m of affinity / anchor_temperature, times a budget alpha_max * sigmoid(Linear(pooled private code)); the stream becomes (1 - budget) * own + sum_n weight_n * borrowed_n, so the borrowed share never exceeds alpha_max.
- [R] AGPR borrowing: multi-head cross-attention from m's private segments to n's, one module per (m, n); anchor loss: InfoNCE of the normalised pooled private code against all anchors, positives = its own modality's anchors.
- [R] BRF: context = MLP(mean of the pooled branches); each direction adds sigmoid(Linear(context)) * cross-attention to its query branch (residual, LayerNorm); head = MLP([pooled private; pooled shared; context]).
- [R] classification: cross-entropy on C logits, label distance 1 between different classes in the margin loss.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from msa.models.base import ModelOutput, check_model_config
from msa.models.layers import length_mask, masked_mean, mlp, sinusoidal_positions
from msa.platform.core.errors import MsaError
from msa.platform.core.spec import DataSpec


@dataclass
class DBRConfig:
    """Hyperparameters of DBR.

    Args:
        d: width of every code and token.
        heads: attention heads everywhere; must divide d.
        dropout: dropout in the encoders, attention and head.
        conv_kernel: kernel of the Conv1d projection (odd).
        encoder_layers: layers of each private encoder and of the shared encoder.
        segments: time segments every modality is pooled to.
        use_tsf, use_agpr, use_brf: the three rebalancing modules (off: the plain decoupling path).
        tsf_kernel: kernel of TSF's depth-wise temporal convolution (odd).
        n_anchors: AGPR anchors per modality.
        alpha_max: AGPR's cap on the share a private stream borrows from the others.
        anchor_temperature: temperature of AGPR's router and anchor loss.
        w_recon, w_selfreg, w_ortho, w_margin, w_anchor, w_decorr: loss weights (0 switches a term off).
    """

    d: int = 64
    heads: int = 4
    dropout: float = 0.1
    conv_kernel: int = 3
    encoder_layers: int = 1
    segments: int = 8
    use_tsf: bool = True
    use_agpr: bool = True
    use_brf: bool = True
    tsf_kernel: int = 3
    n_anchors: int = 4
    alpha_max: float = 0.5
    anchor_temperature: float = 0.1
    w_recon: float = 0.1
    w_selfreg: float = 0.1
    w_ortho: float = 0.01
    w_margin: float = 0.01
    w_anchor: float = 0.1
    w_decorr: float = 0.01

    def __post_init__(self) -> None:
        check_model_config(self, "DBR")
        for name in ("conv_kernel", "tsf_kernel"):
            if getattr(self, name) < 1 or getattr(self, name) % 2 == 0:
                raise MsaError(f"DBR: {name} must be odd and >= 1, got {getattr(self, name)}")
        for name in ("encoder_layers", "segments", "n_anchors"):
            if getattr(self, name) < 1:
                raise MsaError(f"DBR: {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.alpha_max <= 1.0:
            raise MsaError(f"DBR: alpha_max must be in [0, 1], got {self.alpha_max}")
        if self.anchor_temperature <= 0:
            raise MsaError(f"DBR: anchor_temperature must be > 0, got {self.anchor_temperature}")


def transformer_encoder(config: DBRConfig) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(config.d, config.heads, 4 * config.d, config.dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, config.encoder_layers, enable_nested_tensor=False)


def segment_pool(x: torch.Tensor, lengths: torch.Tensor, segments: int) -> torch.Tensor:
    """Masked adaptive average pooling of ``x: (B, T, d)`` over its real steps to ``(B, S, d)``."""
    lengths = lengths.clamp(min=1).to(x.device).float().unsqueeze(1)  # (B, 1)
    s = torch.arange(segments, device=x.device).float().unsqueeze(0)  # (1, S)
    start = torch.floor(s * lengths / segments)
    end = torch.maximum(start + 1, torch.ceil((s + 1) * lengths / segments))  # (B, S)
    steps = torch.arange(x.shape[1], device=x.device).float().view(1, 1, -1)  # (1, 1, T)
    inside = ((steps >= start.unsqueeze(-1)) & (steps < end.unsqueeze(-1))).to(x.dtype)  # (B, S, T)
    return torch.einsum("bst,btd->bsd", inside / inside.sum(-1, keepdim=True), x)


class TemporalStructuralFusion(nn.Module):
    """TSF over the shared segments ``(B, M, S, d)``: gated mix of a temporal and a structural path."""

    def __init__(self, modalities: int, config: DBRConfig):
        super().__init__()
        c = config
        self.temporal = nn.ModuleList(nn.Conv1d(c.d, c.d, c.tsf_kernel, padding=c.tsf_kernel // 2, groups=c.d)
                                      for _ in range(modalities))
        self.modality_embedding = nn.Parameter(torch.randn(modalities, c.d) * 0.02)
        self.norm = nn.LayerNorm(c.d)
        self.structural = nn.MultiheadAttention(c.d, c.heads, dropout=c.dropout, batch_first=True)
        self.gate = nn.Linear(2 * c.d, c.d)

    def forward(self, shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the merged tokens, the gate, and the two paths (all ``(B, M, S, d)``)."""
        b, m, s, d = shared.shape
        temporal = torch.stack([F.gelu(conv(shared[:, i].transpose(1, 2))).transpose(1, 2)
                                for i, conv in enumerate(self.temporal)], dim=1)
        tokens = self.norm(shared + self.modality_embedding[None, :, None, :]).transpose(1, 2).reshape(b * s, m, d)
        structural = self.structural(tokens, tokens, tokens, need_weights=False)[0].reshape(b, s, m, d).transpose(1, 2)
        gate = torch.sigmoid(self.gate(torch.cat([temporal, structural], dim=-1)))
        return gate * temporal + (1 - gate) * structural, gate, temporal, structural


class AnchorGuidedPrivateRouting(nn.Module):
    """AGPR over the private segments of each modality: capped, anchor-routed borrowing."""

    def __init__(self, modalities: tuple[str, ...], config: DBRConfig):
        super().__init__()
        c = config
        self.modalities, self.alpha_max, self.temperature = modalities, c.alpha_max, c.anchor_temperature
        self.anchors = nn.Parameter(torch.randn(len(modalities), c.n_anchors, c.d))
        self.budget = nn.ModuleDict({m: nn.Linear(c.d, 1) for m in modalities})
        self.borrow = nn.ModuleDict({f"{m}<{n}": nn.MultiheadAttention(c.d, c.heads, dropout=c.dropout, batch_first=True)
                                     for m, n in itertools.permutations(modalities, 2)})

    def routing(self, pooled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per target modality, ``(B, M-1)`` borrowing weights over the other modalities; each row sums
        to the target's budget, at most `alpha_max`."""
        anchors = F.normalize(self.anchors, dim=-1)  # (M, K, d)
        weights = {}
        for i, m in enumerate(self.modalities):
            code = F.normalize(pooled[m], dim=-1)  # (B, d)
            sources = [j for j in range(len(self.modalities)) if j != i]
            affinity = torch.einsum("bd,jkd->bjk", code, anchors[sources]).amax(-1)  # (B, M-1)
            budget = self.alpha_max * torch.sigmoid(self.budget[m](pooled[m]))  # (B, 1)
            weights[m] = budget * (affinity / self.temperature).softmax(-1)
        return weights

    def forward(self, private: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        pooled = {m: x.mean(1) for m, x in private.items()}
        weights = self.routing(pooled)
        routed = {}
        for m in self.modalities:
            sources = [n for n in self.modalities if n != m]
            borrowed = torch.stack([self.borrow[f"{m}<{n}"](private[m], private[n], private[n], need_weights=False)[0]
                                    for n in sources], dim=1)  # (B, M-1, S, d)
            w = weights[m]  # (B, M-1)
            routed[m] = (1 - w.sum(-1)).view(-1, 1, 1) * private[m] + torch.einsum("bn,bnsd->bsd", w, borrowed)
        return routed, weights

    def anchor_loss(self, private: dict[str, torch.Tensor]) -> torch.Tensor:
        """InfoNCE of each pooled private code against all anchors; positives: its own modality's."""
        anchors = F.normalize(self.anchors, dim=-1).flatten(0, 1)  # (M*K, d)
        k = self.anchors.shape[1]
        losses = []
        for i, m in enumerate(self.modalities):
            logits = F.normalize(private[m].mean(1), dim=-1) @ anchors.T / self.temperature  # (B, M*K)
            own = logits[:, i * k:(i + 1) * k]
            losses.append((torch.logsumexp(logits, -1) - torch.logsumexp(own, -1)).mean())
        return torch.stack(losses).mean()


class BidirectionalRebalancingFusion(nn.Module):
    """BRF: private <- shared and shared <- private cross-attention, each gated by a pooled context."""

    def __init__(self, config: DBRConfig):
        super().__init__()
        c = config
        self.context = mlp(2 * c.d, c.d, c.d, c.dropout)
        self.private_from_shared = nn.MultiheadAttention(c.d, c.heads, dropout=c.dropout, batch_first=True)
        self.shared_from_private = nn.MultiheadAttention(c.d, c.heads, dropout=c.dropout, batch_first=True)
        self.private_gate, self.shared_gate = nn.Linear(c.d, c.d), nn.Linear(c.d, c.d)
        self.private_norm, self.shared_norm = nn.LayerNorm(c.d), nn.LayerNorm(c.d)

    def forward(self, private: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """private, shared ``(B, N, d)`` tokens -> ``(B, 3d)`` [pooled private; pooled shared; context]."""
        context = self.context(torch.cat([private.mean(1), shared.mean(1)], dim=-1))  # (B, d)
        from_shared = self.private_from_shared(private, shared, shared, need_weights=False)[0]
        from_private = self.shared_from_private(shared, private, private, need_weights=False)[0]
        private = self.private_norm(private + torch.sigmoid(self.private_gate(context)).unsqueeze(1) * from_shared)
        shared = self.shared_norm(shared + torch.sigmoid(self.shared_gate(context)).unsqueeze(1) * from_private)
        return torch.cat([private.mean(1), shared.mean(1), context], dim=-1)


class DBRModel(nn.Module):
    """Decoupling stage -> segments -> TSF (shared) and AGPR (private) -> BRF -> prediction."""

    def __init__(self, spec: DataSpec, config: DBRConfig):
        super().__init__()
        self.spec, self.config = spec, config
        c, modalities = config, spec.modalities
        self.classification = spec.task == "classification"
        self.project = nn.ModuleDict({m: nn.Conv1d(spec.dims[m], c.d, c.conv_kernel, padding=c.conv_kernel // 2, bias=False)
                                      for m in modalities})
        self.private = nn.ModuleDict({m: transformer_encoder(c) for m in modalities})
        self.shared = transformer_encoder(c)
        self.decoders = nn.ModuleDict({m: nn.Linear(2 * c.d, c.d) for m in modalities})
        self.tsf = TemporalStructuralFusion(len(modalities), c) if c.use_tsf else None
        self.agpr = AnchorGuidedPrivateRouting(modalities, c) if c.use_agpr else None
        self.brf = BidirectionalRebalancingFusion(c) if c.use_brf else None
        fused = 3 * c.d if c.use_brf else 2 * c.d
        self.head = nn.Sequential(nn.LayerNorm(fused), nn.Dropout(c.dropout), nn.Linear(fused, c.d), nn.GELU(),
                                  nn.Dropout(c.dropout), nn.Linear(c.d, spec.output_size))
        self.loss_weights = {
            "recon": c.w_recon, "selfreg": c.w_selfreg, "ortho": c.w_ortho, "margin": c.w_margin,
            "anchor": c.w_anchor if c.use_agpr else 0.0, "decorr": c.w_decorr if c.use_tsf else 0.0,
        }

    def forward(self, features: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor],
                labels: torch.Tensor | None = None) -> ModelOutput:
        c, modalities, weights = self.config, self.spec.modalities, self.loss_weights
        real, projected, private, shared = {}, {}, {}, {}
        for m in modalities:
            real[m] = length_mask(lengths[m].clamp(min=1), features[m].shape[1])  # length 0 reads step 0
            x = features[m] * real[m].unsqueeze(-1).to(features[m].dtype)
            projected[m] = self.project[m](x.transpose(1, 2)).transpose(1, 2)  # (B, T, d)
            positioned = projected[m] + sinusoidal_positions(projected[m])
            private[m] = self.private[m](positioned, src_key_padding_mask=~real[m])
            shared[m] = self.shared(positioned, src_key_padding_mask=~real[m])

        aux: dict[str, torch.Tensor] = {}
        if weights["recon"] > 0 or weights["selfreg"] > 0:
            self._reconstruction_losses(projected, private, shared, real, aux)
        if weights["ortho"] > 0:
            aux["ortho"] = torch.stack([_masked_step_mean(F.cosine_similarity(private[m], shared[m], dim=-1).clamp(min=0),
                                                          real[m]) for m in modalities]).mean()
        if weights["margin"] > 0 and labels is not None:
            codes = torch.cat([masked_mean(shared[m], lengths[m].clamp(min=1)) for m in modalities])
            aux["margin"] = hinge_margin_loss(codes, labels.repeat(len(modalities)), self.classification)

        shared_segments = torch.stack([segment_pool(shared[m], lengths[m], c.segments) for m in modalities], dim=1)
        private_segments = {m: segment_pool(private[m], lengths[m], c.segments) for m in modalities}
        if self.tsf is not None:
            shared_segments, _, temporal, structural = self.tsf(shared_segments)
            if weights["decorr"] > 0:
                aux["decorr"] = decorrelation_loss(temporal.mean(2).flatten(0, 1), structural.mean(2).flatten(0, 1))
        if self.agpr is not None:
            if weights["anchor"] > 0:
                aux["anchor"] = self.agpr.anchor_loss(private_segments)
            private_segments, _ = self.agpr(private_segments)
        shared_tokens = shared_segments.flatten(1, 2)  # (B, M*S, d)
        private_tokens = torch.cat([private_segments[m] for m in modalities], dim=1)  # (B, M*S, d)
        if self.brf is not None:
            fused = self.brf(private_tokens, shared_tokens)
        else:
            fused = torch.cat([private_tokens.mean(1), shared_tokens.mean(1)], dim=-1)
        out = self.head(fused)
        prediction = out if self.classification else out.squeeze(-1)
        return ModelOutput(prediction=prediction, fused=fused, aux_losses=aux)

    def _reconstruction_losses(self, projected: dict, private: dict, shared: dict, real: dict, aux: dict) -> None:
        """DLF's reconstruction (decoder of [private; shared] vs the projection) and self-regression
        (the private encoder on the reconstruction vs the private code)."""
        recon, selfreg = [], []
        for m in self.spec.modalities:
            rebuilt = self.decoders[m](torch.cat([private[m], shared[m]], dim=-1))
            recon.append(_masked_step_mean((rebuilt - projected[m].detach()).pow(2).mean(-1), real[m]))
            if self.loss_weights["selfreg"] > 0:
                again = self.private[m](rebuilt + sinusoidal_positions(rebuilt), src_key_padding_mask=~real[m])
                selfreg.append(_masked_step_mean((again - private[m]).pow(2).mean(-1), real[m]))
        if self.loss_weights["recon"] > 0:
            aux["recon"] = torch.stack(recon).mean()
        if selfreg:
            aux["selfreg"] = torch.stack(selfreg).mean()


def _masked_step_mean(values: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean of ``(B, T)`` per-step values over the real steps."""
    return (values * real).sum() / real.sum()


def hinge_margin_loss(codes: torch.Tensor, labels: torch.Tensor, classification: bool, scale: float = 0.15) -> torch.Tensor:
    """DMD's margin loss on ``(N, d)`` codes: for every anchor, every same-label code must be more
    similar (cosine) than every different-label code by ``scale * label distance``."""
    n = codes.shape[0]
    normed = F.normalize(codes.float(), dim=-1)
    cosine = normed @ normed.T  # (N, N)
    labels = labels.float()
    distance = (labels[:, None] - labels[None, :]).abs()
    if classification:
        distance = (distance > 0).float()
    not_self = ~torch.eye(n, dtype=torch.bool, device=codes.device)
    same = (distance == 0) & not_self
    different = distance > 0
    # violation[i, p, q] = margin(i, q) - cos(i, p) + cos(i, q), for positive p and negative q of anchor i
    violation = (scale * distance[:, None, :] - cosine[:, :, None] + cosine[:, None, :]).clamp(min=0)
    pairs = (same[:, :, None] & different[:, None, :]).float()
    per_anchor = (violation * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)
    has_pairs = pairs.sum((1, 2)) > 0
    return per_anchor[has_pairs].mean() if has_pairs.any() else codes.sum() * 0.0


def decorrelation_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared cross-correlation between the batch-standardised features of ``(N, d)`` x and y."""
    zx = (x - x.mean(0)) / (x.std(0, unbiased=False) + 1e-5)
    zy = (y - y.mean(0)) / (y.std(0, unbiased=False) + 1e-5)
    return ((zx.T @ zy) / x.shape[0]).pow(2).mean()
