"""Static & temporal self-distillation (paper appendix A): DINO + iBOT + KoLeo + Gram anchoring.

Images are streams with T = 1, so one code path serves both. A clip's global descriptor is the temporal
mean of its CLS tokens. The student sees masked global crops and unmasked local crops; the EMA teacher
sees the unmasked global crops; the Gram teacher (a frozen copy of the initial backbone) anchors the
patch-similarity structure of image global crops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .losses import dino_loss, gram_loss, ibot_loss, koleo_loss, sinkhorn_knopp


class DINOHead(nn.Module):
    """MLP -> bottleneck -> L2 normalise -> cosine with L2-normalised prototypes (DINO's projection head)."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, prototypes: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.bottleneck = nn.Linear(hidden, bottleneck)
        self.prototypes = nn.Linear(bottleneck, prototypes, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # cosine scores against unit-norm prototypes (DINO's weight-normalised last layer, norm fixed at 1):
        # logits in [-1, 1] whatever the weights' scale, so the temperatures mean what they say
        z = F.normalize(self.bottleneck(self.mlp(x)), dim=-1)
        return F.linear(z, F.normalize(self.prototypes.weight, dim=-1))


@dataclass
class SSLWeights:
    dino: float = 1.0
    ibot: float = 1.0
    koleo: float = 0.1
    gram: float = 1.0
    student_temperature: float = 0.1
    teacher_temperature: float = 0.05


def _encode(backbone, views: torch.Tensor, masks=None, rope_coord_scale=None):
    """views (B, T, 3, S, S) normalised -> (CLS mean (B, D), patches (B, T, P, D))."""
    out = backbone(views, output_hidden_states=False, masks=masks, rope_coord_scale=rope_coord_scale)
    return out.pooler_output.mean(dim=1), out.last_hidden_state


def ssl_losses(
    student_backbone: nn.Module,
    student_dino: DINOHead,
    student_ibot: DINOHead,
    teacher_backbone: nn.Module,
    teacher_dino: DINOHead,
    teacher_ibot: DINOHead,
    gram_teacher: nn.Module | None,
    global_views: list[torch.Tensor],
    local_views: list[torch.Tensor],
    global_masks: list[torch.Tensor],
    weights: SSLWeights,
    rope_coord_scale: tuple[float, float] | None = None,
    images: bool = True,
) -> dict[str, torch.Tensor]:
    """One batch of clips (or images, T = 1) -> dict of the SSL terms and their weighted sum ``"ssl"``.

    ``global_views``: 2 x (B, T, 3, S, S); ``local_views``: n x (B, T, 3, s, s); ``global_masks``: 2 x (B, T, h, w).
    Gram anchoring applies only when ``images`` is true (global crops of images, as in the paper).
    """
    b = global_views[0].shape[0]
    with torch.no_grad():
        t_cls, t_patch = zip(*(_encode(teacher_backbone, v) for v in global_views))
        t_dino = [sinkhorn_knopp(teacher_dino(c), weights.teacher_temperature) for c in t_cls]  # per global view (B, K)
        t_ibot = []
        for patches, mask in zip(t_patch, global_masks):
            flat_mask = mask.reshape(b, -1)
            logits = teacher_ibot(patches.reshape(b, -1, patches.shape[-1]))
            probs = torch.zeros_like(logits)
            # called even when this rank masked nothing: Sinkhorn-Knopp's all-reduces must match across ranks
            probs[flat_mask] = sinkhorn_knopp(logits[flat_mask], weights.teacher_temperature)
            t_ibot.append(probs)

    terms: dict[str, torch.Tensor] = {}
    s_global = [
        _encode(student_backbone, v, m if m.any() else None, rope_coord_scale)
        for v, m in zip(global_views, global_masks)
    ]
    s_local = [_encode(student_backbone, v, None, rope_coord_scale)[0] for v in local_views]

    # DINO: every student view against every teacher global view except itself
    dino_terms = []
    for ti, target in enumerate(t_dino):
        for si, (cls, _) in enumerate(s_global):
            if si != ti:
                dino_terms.append(dino_loss(student_dino(cls), target, weights.student_temperature))
        for cls in s_local:
            dino_terms.append(dino_loss(student_dino(cls), target, weights.student_temperature))
    terms["dino"] = torch.stack(dino_terms).mean()

    ibot_terms = []
    for (_, patches), mask, target in zip(s_global, global_masks, t_ibot):
        logits = student_ibot(patches.reshape(b, -1, patches.shape[-1]))
        ibot_terms.append(ibot_loss(logits, target, mask.reshape(b, -1), weights.student_temperature))
    terms["ibot"] = torch.stack(ibot_terms).mean()

    terms["koleo"] = torch.stack([koleo_loss(cls) for cls, _ in s_global]).mean()

    if images and gram_teacher is not None and weights.gram > 0:
        gram_terms = []
        for (_, patches), view in zip(s_global, global_views):
            with torch.no_grad():
                anchor = gram_teacher(view, output_hidden_states=False).last_hidden_state
            gram_terms.append(gram_loss(patches.flatten(1, 2), anchor.flatten(1, 2)))
        terms["gram"] = torch.stack(gram_terms).mean()

    total = weights.dino * terms["dino"] + weights.ibot * terms["ibot"] + weights.koleo * terms["koleo"]
    if "gram" in terms:
        total = total + weights.gram * terms["gram"]
    terms["ssl"] = total
    return terms


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (same order)."""
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student must have the same parameters")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [p.detach() for p in s_params], alpha=1 - momentum)
