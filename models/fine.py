"""FINE: factorized multimodal fusion with mutual-information estimation, a Mixture of Q-Formers
and a Dynamic Contrastive Queue (Liu & Wang, AAAI-26, arXiv 2511.20167; main text only).

Per modality a Mixture of Q-Formers (MoQ) turns the sequence into query tokens; shared and unique
encoders factorise them (a decoder reconstructs the MoQ tokens from both), task encoders keep the
task-relevant part of each, and four mutual-information terms shape the factorisation: shared
codes of two modalities agree (InfoNCE, maximised), unique codes do not (NCE-CLUB, minimised),
task-shared codes hold no more than the shared label code explains (conditional NCE-CLUB,
minimised), and task-unique codes hold their modality's label code (InfoNCE, maximised). A
Transformer fuses ``[CLS_m; s'_m; u'_m]`` tokens of every modality; the CLS outputs give the
multimodal prediction and one unimodal prediction each. A Dynamic Contrastive Queue keeps the
latest fused projections per class and adds a supervised contrastive loss whose negatives are
angle-compensated by their label distance. Every part can be switched off from the config:
``use_moq``, ``use_dcq``, and any loss by a weight of 0 (it is then not computed).

Reconstruction choices ([R]: where the paper leaves a choice open), one line each:
- [R] MoQ block = pre-norm query self-attention -> cross-attention to the projected, masked sequence -> FFN (4d); `moq_depth` blocks (default 1).
- [R] router = softmax of a linear map of the masked mean of the projected sequence; top-k weights renormalised to sum 1; experts run densely as one batched computation (per-expert weights stacked), unselected ones weighted 0.
- [R] in training, an expert no sample of the batch chose receives gradient (not output) from its fair share (B/E) of the samples that prefer it most, at their router probability, so no expert is starved; outputs are those of plain top-k routing.
- [R] load balancing = Switch Transformer's E * sum_e f_e * P_e (f_e: share of top-k assignments, P_e: mean router probability), averaged over modalities.
- [R] use_moq=false replaces the mixture by one Q-Former (no router, no balance loss).
- [R] shared/unique/task encoders and the decoder are token-wise 2-layer MLPs of width d; the decoder reads [s_m; u_m].
- [R] reconstruction target = the MoQ tokens detached (so the encoders cannot shrink them to lower the loss).
- [R] label encoders: a 2-layer MLP on the score (regression) or an embedding of the class (classification); one shared code, one unique code per modality.
- [R] tokens are mean-pooled before every MI critic.
- [R] the MI terms are summed over modality pairs (I_sha, I_uni, I_str) or modalities (I_utr), each pair/modality with its own critic.
- [R] NCE-CLUB critics are trained on the InfoNCE objective on detached codes (loss `critic`, weight 1) while the CLUB estimate that trains the encoders uses the critic's detached weights: a stop-gradient split instead of a second optimizer.
- [R] critic scores are squashed to (-10, 10) by 10 * tanh(f / 10): unbounded, the encoders drove the CLUB game to critic losses above 1e4 within 200 steps.
- [R] I_str appends the shared label code to both task-shared codes; the code is trained with the critic (its InfoNCE objective), and enters the encoders' CLUB estimate detached, so minimising the estimate cannot collapse it.
- [R] the MI terms requiring labels (I_str, I_utr), the unimodal loss and the DCQ loss are computed only when labels are given (training).
- [R] fusion: one pre-norm Transformer encoder over all modalities' [CLS; s'; u'] tokens with learned modality and token-type embeddings; no positional encoding inside a modality's query tokens.
- [R] unimodal heads: a linear map of each CLS output; unimodal target = the multimodal label (the dataset's unimodal labels are not passed to models); Huber (smooth L1) for regression (L1's gradient on a head's bias vanishes when errors split evenly by sign), cross-entropy for classification.
- [R] DCQ classes for regression: round(clip(y, -3, 3)) (7 bins) or sign(y) (3), by `regression_classes`; class id for classification.
- [R] DCQ projection = 2-layer MLP of the fused CLS vector to d, L2-normalised; queues of `queue_size` per class, FIFO, detached, updated after the loss.
- [R] angle compensation: a negative's logit is cos(max(theta - angle_step * label_distance, 0)) / temperature (label distance = bin distance, 1 between classes), positives cos(theta) / temperature; SupCon averaging over positives.
- [R] the paper's b_mi * L_MI is split into one weight per term (recon, mi_shared, mi_unique, mi_task_shared, mi_task_unique), so a sweep or an ablation can set each.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from msa.models.base import ModelOutput, check_model_config
from msa.models.layers import ConcatCritic, infonce_lower_bound, length_mask, masked_mean, mlp, nce_club_upper_bound
from msa.platform.core.errors import MsaError
from msa.platform.core.spec import DataSpec


@dataclass
class FINEConfig:
    """Hyperparameters of FINE.

    Args:
        d: width of every token and code.
        heads: attention heads (MoQ and fusion); must divide d.
        dropout: dropout in attention, FFNs and heads.
        use_moq: a mixture of Q-Formers per modality (else one Q-Former).
        n_queries: query tokens per expert.
        n_experts: Q-Former experts per modality.
        top_k: experts each sample is routed to.
        moq_depth: Q-Former blocks per expert.
        fusion_depth: Transformer layers of the fusion.
        critic_hidden: hidden width of every MI critic.
        use_dcq: the Dynamic Contrastive Queue loss.
        queue_size: queued projections per class.
        temperature: contrastive temperature.
        angle_step: radians added to a negative's target angle per unit of label distance.
        regression_classes: DCQ classes for regression: 7 (rounded score) or 3 (sign).
        w_unimodal, w_contrastive, w_balance, w_recon, w_mi_shared, w_mi_unique,
        w_mi_task_shared, w_mi_task_unique: loss weights (0 switches the term off).
    """

    d: int = 64
    heads: int = 4
    dropout: float = 0.1
    use_moq: bool = True
    n_queries: int = 4
    n_experts: int = 4
    top_k: int = 2
    moq_depth: int = 1
    fusion_depth: int = 2
    critic_hidden: int = 512
    use_dcq: bool = True
    queue_size: int = 32
    temperature: float = 0.1
    angle_step: float = 0.1
    regression_classes: int = 7
    w_unimodal: float = 0.1
    w_contrastive: float = 0.05
    w_balance: float = 0.01
    w_recon: float = 0.1
    w_mi_shared: float = 0.02
    w_mi_unique: float = 0.02
    w_mi_task_shared: float = 0.02
    w_mi_task_unique: float = 0.02

    def __post_init__(self) -> None:
        check_model_config(self, "FINE")
        if not 1 <= self.top_k <= self.n_experts:
            raise MsaError(f"FINE: top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        if self.regression_classes not in (3, 7):
            raise MsaError(f"FINE: regression_classes must be 3 or 7, got {self.regression_classes}")
        for name in ("n_queries", "n_experts", "moq_depth", "fusion_depth", "queue_size", "critic_hidden"):
            if getattr(self, name) < 1:
                raise MsaError(f"FINE: {name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise MsaError(f"FINE: temperature must be > 0, got {self.temperature}")


class ExpertLinear(nn.Module):
    """One linear map per expert, applied to all experts at once: ``(B, E, N, in) -> (B, E, N, out)``;
    an input with expert axis 1 (a sequence every expert reads) is broadcast to all of them."""

    def __init__(self, experts: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default range
        self.weight = nn.Parameter(torch.empty(experts, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(experts, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            return torch.einsum("bni,eio->beno", x[:, 0], self.weight) + self.bias[:, None]
        return torch.einsum("beni,eio->beno", x, self.weight) + self.bias[:, None]


class ExpertLayerNorm(nn.Module):
    """LayerNorm with its own affine parameters per expert, over ``(B, E, N, d)``."""

    def __init__(self, experts: int, d: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(experts, d)), nn.Parameter(torch.zeros(experts, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:]) * self.weight[:, None] + self.bias[:, None]


class QFormerBlock(nn.Module):
    """Pre-norm Q-Former block for E experts at once: query self-attention, cross-attention from the
    queries to the (masked) sequence, FFN; each with a residual."""

    def __init__(self, experts: int, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm_self, self.norm_cross, self.norm_ffn = (ExpertLayerNorm(experts, d) for _ in range(3))
        self.self_qkv, self.self_out = ExpertLinear(experts, d, 3 * d), ExpertLinear(experts, d, d)
        self.cross_q, self.cross_kv = ExpertLinear(experts, d, d), ExpertLinear(experts, d, 2 * d)
        self.cross_out = ExpertLinear(experts, d, d)
        self.ffn_in, self.ffn_out = ExpertLinear(experts, d, 4 * d), ExpertLinear(experts, 4 * d, d)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        def split(x: torch.Tensor) -> torch.Tensor:  # (B, E, N, d) -> (B, E, H, N, d / H)
            return x.unflatten(-1, (self.heads, -1)).transpose(2, 3)

        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask, dropout_p=dropout)
        return out.transpose(2, 3).flatten(-2)

    def forward(self, queries: torch.Tensor, sequence: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """queries ``(B, E, Q, d)``, sequence ``(B, 1, T, d)``, attend ``(B, 1, 1, 1, T)`` (True = real step)."""
        queries = queries + self.self_out(self._attend(*self.self_qkv(self.norm_self(queries)).chunk(3, -1), None))
        keys, values = self.cross_kv(sequence).chunk(2, -1)  # (B, E, T, d) each
        queries = queries + self.cross_out(self._attend(self.cross_q(self.norm_cross(queries)), keys, values, attend))
        hidden = F.dropout(F.gelu(self.ffn_in(self.norm_ffn(queries))), self.dropout, self.training)
        return queries + self.ffn_out(hidden)


class QFormerExperts(nn.Module):
    """`experts` independent Q-Formers (each its own `n_queries` learned queries and `depth`
    blocks) run as one batched computation: ``(B, T, d) -> (B, E, Q, d)``."""

    def __init__(self, experts: int, config: FINEConfig):
        super().__init__()
        c = config
        self.queries = nn.Parameter(torch.randn(experts, c.n_queries, c.d) * 0.02)
        self.blocks = nn.ModuleList(QFormerBlock(experts, c.d, c.heads, c.dropout) for _ in range(c.moq_depth))
        self.norm = ExpertLayerNorm(experts, c.d)

    def forward(self, sequence: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        attend = length_mask(lengths.clamp(min=1), sequence.shape[1])[:, None, None, None, :]  # length 0 reads step 0
        queries = self.queries.unsqueeze(0).expand(sequence.shape[0], -1, -1, -1)
        for block in self.blocks:
            queries = block(queries, sequence.unsqueeze(1), attend)
        return self.norm(queries)


class MixtureOfQFormers(nn.Module):
    """Experts mixed per sample by a top-k router; also returns the Switch balance loss."""

    def __init__(self, config: FINEConfig):
        super().__init__()
        self.top_k = config.top_k
        self.experts = QFormerExperts(config.n_experts, config)
        self.router = nn.Linear(config.d, config.n_experts)

    def forward(self, sequence: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = self.router(masked_mean(sequence, lengths)).softmax(-1)  # (B, E)
        top_p, top_i = probabilities.topk(self.top_k, dim=-1)  # (B, k)
        weights = torch.zeros_like(probabilities).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
        outputs = self.experts(sequence, lengths)  # (B, E, Q, d)
        mixed = torch.einsum("be,beqd->bqd", weights, outputs)  # (B, Q, d)
        if self.training:
            # Adds exactly zero to the output: only gradients reach the starving experts.
            feed = self._starving_feed(weights, probabilities)
            mixed = mixed + torch.einsum("be,beqd->bqd", feed, outputs - outputs.detach())
        experts = probabilities.shape[1]
        assigned = torch.zeros_like(probabilities).scatter(-1, top_i, 1.0).mean(0) / self.top_k  # f_e, (E,)
        balance = experts * (assigned * probabilities.mean(0)).sum()
        return mixed, balance

    @staticmethod
    def _starving_feed(weights: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
        """Gradient-only weights for experts no sample of the batch was routed to: each gets its
        fair share (B / E) of the samples whose router prefers it most, at weight = that
        probability. Without it such an expert gets no gradient and can fall out of use for good
        (the collapse the balance loss only discourages); the forward output is unchanged, so
        training and evaluation route identically."""
        feed = torch.zeros_like(weights)
        starving = torch.nonzero(~(weights > 0).any(dim=0)).squeeze(-1)  # (S,)
        if starving.numel() == 0:
            return feed
        share = max(1, -(-weights.shape[0] // weights.shape[1]))
        favourites = probabilities[:, starving].topk(min(share, weights.shape[0]), dim=0).indices  # (share, S)
        columns = starving.expand_as(favourites)
        feed[favourites, columns] = probabilities[favourites, columns].detach()
        return feed


class ModalityBranch(nn.Module):
    """One modality: projection, MoQ (or one Q-Former), shared/unique/task encoders, decoder,
    unique label code and unimodal head."""

    def __init__(self, dim: int, config: FINEConfig, output_size: int, label_encoder: nn.Module):
        super().__init__()
        c = config
        self.project = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, c.d))
        self.moq = MixtureOfQFormers(c) if c.use_moq else QFormerExperts(1, c)
        self.shared, self.unique = mlp(c.d, c.d, c.d, c.dropout), mlp(c.d, c.d, c.d, c.dropout)
        self.shared_task, self.unique_task = mlp(c.d, c.d, c.d, c.dropout), mlp(c.d, c.d, c.d, c.dropout)
        self.decoder = mlp(2 * c.d, c.d, c.d, c.dropout)
        self.unique_label = label_encoder
        self.unimodal_head = nn.Linear(c.d, output_size)


class FINEModel(nn.Module):
    """MoQ per modality -> factorised codes with MI terms -> fusion Transformer -> heads (+ DCQ)."""

    def __init__(self, spec: DataSpec, config: FINEConfig):
        super().__init__()
        self.spec, self.config = spec, config
        c, modalities = config, spec.modalities
        self.classification = spec.task == "classification"
        self.branches = nn.ModuleDict({m: ModalityBranch(spec.dims[m], c, spec.output_size, self._label_encoder())
                                       for m in modalities})
        pairs = [f"{m}-{n}" for m, n in itertools.combinations(modalities, 2)]
        # The shared label code only enters the conditional term, which needs a modality pair.
        self.shared_label = self._label_encoder() if pairs and c.w_mi_task_shared > 0 else None
        self.cls = nn.Parameter(torch.randn(len(modalities), c.d) * 0.02)
        self.modality_embedding = nn.Parameter(torch.randn(len(modalities), c.d) * 0.02)
        self.type_embedding = nn.Parameter(torch.randn(3, c.d) * 0.02)  # cls, shared, unique
        layer = nn.TransformerEncoderLayer(c.d, c.heads, 4 * c.d, c.dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.fusion = nn.TransformerEncoder(layer, c.fusion_depth, enable_nested_tensor=False)
        fused = c.d * len(modalities)
        self.head = nn.Sequential(nn.LayerNorm(fused), nn.Dropout(c.dropout), nn.Linear(fused, c.d), nn.GELU(),
                                  nn.Dropout(c.dropout), nn.Linear(c.d, spec.output_size))
        hidden = c.critic_hidden
        self.critics = nn.ModuleDict()
        if c.w_mi_shared > 0:
            self.critics.update({f"shared:{p}": ConcatCritic(c.d, c.d, hidden) for p in pairs})
        if c.w_mi_unique > 0:
            self.critics.update({f"unique:{p}": ConcatCritic(c.d, c.d, hidden) for p in pairs})
        if c.w_mi_task_shared > 0:
            self.critics.update({f"task_shared:{p}": ConcatCritic(2 * c.d, 2 * c.d, hidden) for p in pairs})
        if c.w_mi_task_unique > 0:
            self.critics.update({f"task_unique:{m}": ConcatCritic(c.d, c.d, hidden) for m in modalities})
        self.dcq_classes = spec.num_classes if self.classification else c.regression_classes
        if c.use_dcq and c.w_contrastive > 0:
            self.projection = mlp(fused, c.d, c.d)
            self.register_buffer("queue", torch.zeros(self.dcq_classes, c.queue_size, c.d))
            self.register_buffer("queue_count", torch.zeros(self.dcq_classes, dtype=torch.long))
            self.register_buffer("queue_next", torch.zeros(self.dcq_classes, dtype=torch.long))
        self.loss_weights = {
            "unimodal": c.w_unimodal, "contrastive": c.w_contrastive if c.use_dcq else 0.0,
            "balance": c.w_balance if c.use_moq else 0.0, "recon": c.w_recon,
            "mi_shared": c.w_mi_shared, "mi_unique": c.w_mi_unique, "mi_task_shared": c.w_mi_task_shared,
            "mi_task_unique": c.w_mi_task_unique, "critic": 1.0,
        }

    def _label_encoder(self) -> nn.Module:
        if self.classification:
            return nn.Embedding(self.spec.num_classes, self.config.d)
        return mlp(1, self.config.d, self.config.d)

    def _label_code(self, encoder: nn.Module, labels: torch.Tensor) -> torch.Tensor:
        if self.classification:
            return encoder(labels)  # (B, d)
        return encoder(labels.to(next(encoder.parameters()).dtype).unsqueeze(-1))  # bf16 weights on a GPU

    def forward(self, features: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor],
                labels: torch.Tensor | None = None) -> ModelOutput:
        weights, modalities = self.loss_weights, self.spec.modalities
        tokens, codes, cls_out = [], {}, {}
        recon, balance = [], []
        for index, m in enumerate(modalities):
            branch = self.branches[m]
            sequence = branch.project(features[m])  # (B, T, d)
            if self.config.use_moq:
                h, balance_m = branch.moq(sequence, lengths[m])  # (B, Q, d)
                balance.append(balance_m)
            else:
                h = branch.moq(sequence, lengths[m])[:, 0]
            s, u = branch.shared(h), branch.unique(h)  # (B, Q, d) each
            recon.append(F.mse_loss(branch.decoder(torch.cat([s, u], dim=-1)), h.detach()))
            s_task, u_task = branch.shared_task(s), branch.unique_task(u)
            codes[m] = {"s": s.mean(1), "u": u.mean(1), "s_task": s_task.mean(1), "u_task": u_task.mean(1)}
            cls = self.cls[index].expand(h.shape[0], 1, -1)
            group = torch.cat([cls + self.type_embedding[0], s_task + self.type_embedding[1],
                               u_task + self.type_embedding[2]], dim=1) + self.modality_embedding[index]
            tokens.append(group)  # (B, 1 + 2Q, d)
        fused_tokens = self.fusion(torch.cat(tokens, dim=1))
        group_size = tokens[0].shape[1]
        for index, m in enumerate(modalities):
            cls_out[m] = fused_tokens[:, index * group_size]  # (B, d)
        fused = torch.cat([cls_out[m] for m in modalities], dim=-1)  # (B, M*d)
        out = self.head(fused)
        prediction = out if self.classification else out.squeeze(-1)

        aux: dict[str, torch.Tensor] = {}
        if weights["recon"] > 0:
            aux["recon"] = torch.stack(recon).mean()
        if balance and weights["balance"] > 0:
            aux["balance"] = torch.stack(balance).mean()
        aux.update(self._mi_terms(codes, labels))
        if labels is not None:
            if weights["unimodal"] > 0:
                aux["unimodal"] = torch.stack([self._task_loss(self.branches[m].unimodal_head(cls_out[m]), labels)
                                               for m in modalities]).mean()
            if weights["contrastive"] > 0:
                aux["contrastive"] = self._dcq_loss(fused, labels)
        return ModelOutput(prediction=prediction, fused=fused, aux_losses=aux)

    def _task_loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.classification:
            return F.cross_entropy(output.float(), labels)
        return F.smooth_l1_loss(output.squeeze(-1).float(), labels.float())

    def _mi_terms(self, codes: dict, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The four MI terms (as losses: maximised bounds negated) and the CLUB critics' training loss."""
        terms: dict[str, list[torch.Tensor]] = {"mi_shared": [], "mi_unique": [], "mi_task_shared": [],
                                               "mi_task_unique": [], "critic": []}
        label_shared = (self._label_code(self.shared_label, labels)
                        if labels is not None and self.shared_label is not None else None)
        for m, n in itertools.combinations(self.spec.modalities, 2):
            pair = f"{m}-{n}"
            if f"shared:{pair}" in self.critics:
                scores = self.critics[f"shared:{pair}"].scores(codes[m]["s"], codes[n]["s"])
                terms["mi_shared"].append(-infonce_lower_bound(scores))
            if f"unique:{pair}" in self.critics:
                self._club(self.critics[f"unique:{pair}"], codes[m]["u"], codes[n]["u"], "mi_unique", terms)
            if f"task_shared:{pair}" in self.critics and label_shared is not None:
                self._club(self.critics[f"task_shared:{pair}"], codes[m]["s_task"], codes[n]["s_task"],
                           "mi_task_shared", terms, condition=label_shared)
        if labels is not None:
            for m in self.spec.modalities:
                if f"task_unique:{m}" in self.critics:
                    label_unique = self._label_code(self.branches[m].unique_label, labels)
                    scores = self.critics[f"task_unique:{m}"].scores(codes[m]["u_task"], label_unique)
                    terms["mi_task_unique"].append(-infonce_lower_bound(scores))
        return {name: torch.stack(values).mean() for name, values in terms.items() if values}

    @staticmethod
    def _club(critic: ConcatCritic, x: torch.Tensor, y: torch.Tensor, name: str, terms: dict,
              condition: torch.Tensor | None = None) -> None:
        """CLUB estimate through the critic's detached weights (trains the encoders), and the
        critic's own InfoNCE objective on detached codes (trains the critic). A condition (the
        shared label code) is appended to both codes; it is trained with the critic, not against
        it, since the encoders minimising the estimate would otherwise collapse it."""
        if condition is None:
            encoder_side, critic_side = (x, y), (x.detach(), y.detach())
        else:
            encoder_side = (torch.cat([x, condition.detach()], -1), torch.cat([y, condition.detach()], -1))
            critic_side = (torch.cat([x.detach(), condition], -1), torch.cat([y.detach(), condition], -1))
        terms[name].append(nce_club_upper_bound(critic.scores(*encoder_side, frozen=True)))
        terms["critic"].append(-infonce_lower_bound(critic.scores(*critic_side)))

    def _dcq_classes(self, labels: torch.Tensor) -> torch.Tensor:
        if self.classification:
            return labels.long()
        clipped = labels.float().clamp(-3, 3)
        if self.dcq_classes == 7:
            return (torch.round(clipped) + 3).long()
        return (torch.sign(clipped) + 1).long()

    def _dcq_loss(self, fused: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """SupCon over the batch and the class-wise queues, angle-compensated negatives; then
        the batch's detached projections enter their classes' queues (FIFO)."""
        c = self.config
        z = F.normalize(self.projection(fused).float(), dim=-1)  # (B, d)
        classes = self._dcq_classes(labels)
        filled = torch.arange(c.queue_size, device=z.device)[None, :] < self.queue_count[:, None]  # (K, L)
        queued = self.queue[filled].float()  # (N_q, d)
        queued_classes = torch.arange(self.dcq_classes, device=z.device)[:, None].expand_as(filled)[filled]
        keys = torch.cat([z, queued])  # (B + N_q, d)
        key_classes = torch.cat([classes, queued_classes])
        cosine = (z @ keys.T).clamp(-1 + 1e-6, 1 - 1e-6)  # (B, B + N_q)
        distance = (classes[:, None] - key_classes[None, :]).abs().float()
        if self.classification:
            distance = (distance > 0).float()
        positive = distance == 0
        not_self = torch.ones_like(positive)
        not_self[:, : len(z)].fill_diagonal_(False)
        angle = torch.acos(cosine)
        compensated = torch.cos((angle - c.angle_step * distance).clamp(min=0.0))
        logits = torch.where(positive, cosine, compensated) / c.temperature
        logits = logits.masked_fill(~not_self, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        positives = positive & not_self
        has_positive = positives.any(dim=1)
        per_anchor = -(log_prob.masked_fill(~positives, 0.0)).sum(1) / positives.sum(1).clamp(min=1)
        loss = per_anchor[has_positive].mean() if has_positive.any() else z.sum() * 0.0
        self._enqueue(z.detach(), classes)
        return loss

    @torch.no_grad()
    def _enqueue(self, z: torch.Tensor, classes: torch.Tensor) -> None:
        size = self.config.queue_size
        for vector, label in zip(z, classes.tolist()):
            slot = int(self.queue_next[label])
            self.queue[label, slot] = vector.to(self.queue.dtype)
            self.queue_next[label] = (slot + 1) % size
            self.queue_count[label] = min(int(self.queue_count[label]) + 1, size)

