"""The pretraining objectives of the paper (section 3.3 and appendix A), as plain functions.

Every function takes tensors and returns a scalar tensor, so each one can be checked on small
hand-computable cases (``tests/training/test_losses.py``). The modules that produce their inputs live in
``ssl.py`` (DINO/iBOT heads, EMA teacher), ``geometry.py`` (normalised ground truth) and ``captioning.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------------
# Static & temporal representation learning (DINO, iBOT, KoLeo, Gram)
# ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets (N, K) whose prototypes are used equally often across the batch (SwAV/DINOv2 centering).

    Rows sum to 1. Under torch.distributed the column sums are all-reduced, so every rank centres against
    the global batch, exactly as a single process holding all samples would.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    logits = teacher_logits.float()
    # one shift for all ranks keeps the global normalisation exact; a rank may hold no rows (iBOT without masks)
    peak = logits.max().detach().clone() if logits.numel() else torch.tensor(-torch.inf, device=logits.device)
    if distributed:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    q = torch.exp((logits - peak) / temperature).t()  # (K, N)
    n = torch.tensor(float(q.shape[1]), dtype=q.dtype, device=q.device)
    if distributed:
        torch.distributed.all_reduce(n)
    k = q.shape[0]
    total = q.sum()
    if distributed:
        torch.distributed.all_reduce(total)
    q = q / total
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)
        if distributed:
            torch.distributed.all_reduce(rows)
        q = q / rows / k
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).t()


def dino_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temperature: float = 0.1
) -> torch.Tensor:
    """Cross-entropy ``-sum p_t log p_s`` averaged over rows; logits/probs are (N, K)."""
    log_p = F.log_softmax(student_logits.float() / student_temperature, dim=-1)
    return -(teacher_probs * log_p).sum(dim=-1).mean()


def ibot_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_probs: torch.Tensor,
    masks: torch.Tensor,
    student_temperature: float = 0.1,
) -> torch.Tensor:
    """iBOT: DINO's cross-entropy on the patches masked in the student view.

    ``student_patch_logits`` (N, P, K), ``teacher_patch_probs`` (N, P, K), ``masks`` (N, P) bool. Each view's
    masked patches are averaged first, then views are averaged, so views with few masked patches count as
    much as others (DINOv2's weighting). Returns 0 (with a graph) when nothing is masked.
    """
    masks = masks.bool()
    if not masks.any():
        return student_patch_logits.sum() * 0.0
    log_p = F.log_softmax(student_patch_logits.float() / student_temperature, dim=-1)
    per_patch = -(teacher_patch_probs * log_p).sum(dim=-1)  # (N, P)
    per_view = (per_patch * masks).sum(dim=1) / masks.sum(dim=1).clamp(min=1)
    has_mask = masks.any(dim=1)
    return per_view[has_mask].mean()


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo: ``-1/n sum_i log(min_{j != i} ||x_i - x_j||)`` on the L2-normalised rows of (n, d)."""
    if features.shape[0] < 2:
        raise ValueError(f"KoLeo needs at least 2 vectors, got {features.shape[0]}")
    x = F.normalize(features.float(), dim=-1, eps=eps)
    dist = torch.cdist(x, x)
    dist = dist + torch.eye(x.shape[0], device=x.device, dtype=x.dtype) * 1e9  # exclude j == i
    nearest = dist.min(dim=1).values
    return -torch.log(nearest + eps).mean()


def gram_loss(student_patches: torch.Tensor, gram_teacher_patches: torch.Tensor) -> torch.Tensor:
    """Gram anchoring on (N, P, D) patch features: ``||Xs Xs^T - Xg Xg^T||_F^2`` with L2-normalised rows.

    Divided by P^2 (the number of Gram entries) and averaged over N, so the value does not grow with the
    resolution (DINOv3 uses the same mean-squared form). Identical features give exactly 0.
    """
    xs = F.normalize(student_patches.float(), dim=-1)
    xg = F.normalize(gram_teacher_patches.float(), dim=-1)
    diff = xs @ xs.transpose(1, 2) - xg @ xg.transpose(1, 2)
    return diff.pow(2).mean(dim=(1, 2)).mean()


# ------------------------------------------------------------------------------------------------------
# Streaming geometric reconstruction
# ------------------------------------------------------------------------------------------------------
def spatial_gradients(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences along x and y of (..., H, W): shapes (..., H, W-1) and (..., H-1, W)."""
    return image[..., :, 1:] - image[..., :, :-1], image[..., 1:, :] - image[..., :-1, :]


def depth_confidence_loss(
    pred_depth: torch.Tensor,
    gt_depth: torch.Tensor,
    confidence: torch.Tensor,
    valid: torch.Tensor | None = None,
    alpha: float = 0.2,
) -> torch.Tensor:
    """Eq. 7: ``c|D^ - D| + c|grad D^ - grad D| - alpha log c``, averaged over valid pixels (shapes (..., H, W)).

    A gradient term counts where both of its pixels are valid. ``confidence`` must be positive.
    """
    if valid is None:
        valid = torch.ones_like(gt_depth, dtype=torch.bool)
    valid = valid.bool()
    c = confidence.float()
    count = valid.sum().clamp(min=1)
    regression = (c * (pred_depth.float() - gt_depth.float()).abs() * valid).sum() / count
    log_term = (torch.log(c) * valid).sum() / count
    gx_p, gy_p = spatial_gradients(pred_depth.float())
    gx_t, gy_t = spatial_gradients(gt_depth.float())
    vx = valid[..., :, 1:] & valid[..., :, :-1]
    vy = valid[..., 1:, :] & valid[..., :-1, :]
    cx, cy = c[..., :, 1:], c[..., 1:, :]
    grad = (cx * (gx_p - gx_t).abs() * vx).sum() / vx.sum().clamp(min=1)
    grad = grad + (cy * (gy_p - gy_t).abs() * vy).sum() / vy.sum().clamp(min=1)
    return regression + grad - alpha * log_term


def masked_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error over the valid positions; ``valid`` broadcasts over trailing channels."""
    err = (pred.float() - target.float()).abs()
    if valid is None:
        return err.mean()
    valid = valid.bool()
    while valid.ndim < err.ndim:
        valid = valid.unsqueeze(-1)
    valid = valid.expand_as(err)
    return (err * valid).sum() / valid.sum().clamp(min=1)


def geometry_loss(
    predictions: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    alpha: float = 0.2,
) -> dict[str, torch.Tensor]:
    """Eq. 6/8: depth (with confidence), ray, point and camera L1 terms and their sum under ``"geo"``.

    ``predictions``: the heads' dict (depth (B,T,H,W), depth_conf, rays (B,T,H,W,6), points (B,T,H,W,3),
    pose_enc (B,T,9)); ``targets``: the same keys (normalised ground truth, see ``geometry.py``) plus ``valid``.
    """
    valid = targets["valid"]
    terms = {
        "depth": depth_confidence_loss(predictions["depth"], targets["depth"], predictions["depth_conf"], valid, alpha),
        "ray": masked_l1(predictions["rays"], targets["rays"], valid),
        "points": masked_l1(predictions["points"], targets["points"], valid),
        "camera": masked_l1(predictions["pose_enc"], targets["pose_enc"]),
    }
    terms["geo"] = sum(terms.values())
    return terms
