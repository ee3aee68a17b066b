"""Distillation losses as small pure functions. ``mask`` is 1 for real tokens and 0 for padding."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``KL(teacher ‖ student)`` of the softened distributions, times ``T²`` (Hinton et al., 2015).

    Args:
        student_logits, teacher_logits: ``(B, T, V)``
        mask: ``(B, T)``
    Returns: scalar, mean over unmasked positions.
    """
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(-1)  # (B, T)
    return _masked_mean(kl, mask) * temperature**2


def ce_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy. ``logits (B, T, V)``, ``input_ids (B, T)``, ``mask (B, T)`` → scalar.

    Position ``t`` predicts token ``t + 1``; a pair counts only when both tokens are real.
    """
    per_token = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none"
    )  # (B, T - 1)
    return _masked_mean(per_token, mask[:, 1:] * mask[:, :-1])


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Relative squared error ``Σ‖s − t‖² / Σ‖t‖²`` between layer outputs ``(B, T, C)`` over real tokens.

    Normalised by the teacher output's energy so that layers whose MLP outputs differ by orders of magnitude
    (the last blocks of Llama-family models) weigh alike; 1.0 is the error of outputting zeros.
    """
    mask = mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
    error = ((student.float() - teacher.float()).pow(2) * mask).sum()
    return error / (teacher.float().pow(2) * mask).sum().clamp(min=1e-12)
