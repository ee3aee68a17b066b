"""Distillation losses as small pure functions. ``mask`` is 1 for real tokens and 0 for padding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Names of the KD divergences `distillation_divergence` computes (`distill.divergence`).
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def _softened_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities ``(B, T, V)`` of ``logits (B, T, V) / T``, in float32."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q)`` per position ``(B, T)`` from log-probabilities ``(B, T, V)``."""
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Forward ``KL(teacher ‖ student)`` of the softened distributions, times ``T²`` (Hinton et al., 2015).

    Mass-covering: the student pays wherever the teacher has mass it lacks.

    Args:
        student_logits, teacher_logits: ``(B, T, V)``
        mask: ``(B, T)``
    Returns: scalar, mean over unmasked positions.
    """
    student = _softened_log_probs(student_logits, temperature)  # (B, T, V)
    teacher = _softened_log_probs(teacher_logits, temperature)
    return _masked_mean(_kl(teacher, student), mask) * temperature**2


def reverse_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Reverse ``KL(student ‖ teacher)`` of the softened distributions, times ``T²`` (MiniLLM, GKD β=1).

    Mode-seeking: the student pays for mass it puts where the teacher has little.

    Args:
        student_logits, teacher_logits: ``(B, T, V)``
        mask: ``(B, T)``
    Returns: scalar, mean over unmasked positions.
    """
    student = _softened_log_probs(student_logits, temperature)  # (B, T, V)
    teacher = _softened_log_probs(teacher_logits, temperature)
    return _masked_mean(_kl(student, teacher), mask) * temperature**2


def jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    beta: float = 0.5,
) -> torch.Tensor:
    """Generalised Jensen–Shannon divergence of the softened distributions, times ``T²``, as TRL's
    ``GKDTrainer.generalized_jsd_loss`` (Agarwal et al., 2024, eq. 1).

    ``JSD_β = β · KL(teacher ‖ m) + (1 − β) · KL(student ‖ m)`` with the mixture
    ``m = β · p_teacher + (1 − β) · p_student``, formed in log space. β = 0.5 is the symmetric JSD,
    bounded by ``ln 2 · T²``. As β → 0 or 1, ``JSD_β`` itself goes to 0; following TRL, the endpoints
    are instead the limits of ``JSD_β / β`` and ``JSD_β / (1 − β)``: β = 0 gives forward
    ``KL(teacher ‖ student)`` (as ``kd_loss``) and β = 1 reverse ``KL(student ‖ teacher)`` (as
    ``reverse_kd_loss``), so the endpoints stay a usable loss rather than a vanishing one.

    Args:
        student_logits, teacher_logits: ``(B, T, V)``
        mask: ``(B, T)``
        beta: weight of the teacher in the mixture, in ``[0, 1]``.
    Returns: scalar, mean over unmasked positions.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd_loss: beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return kd_loss(student_logits, teacher_logits, mask, temperature)
    if beta == 1.0:
        return reverse_kd_loss(student_logits, teacher_logits, mask, temperature)
    student = _softened_log_probs(student_logits, temperature)  # (B, T, V)
    teacher = _softened_log_probs(teacher_logits, temperature)
    # logaddexp, elementwise: no (2, B, T, V) stack as logsumexp over a stacked pair would need.
    mixture = torch.logaddexp(teacher + math.log(beta), student + math.log1p(-beta))  # (B, T, V)
    jsd = beta * _kl(teacher, mixture) + (1.0 - beta) * _kl(student, mixture)  # (B, T)
    return _masked_mean(jsd, mask) * temperature**2


def distillation_divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """The KD loss named ``name`` (one of ``DIVERGENCES``; ``jsd_beta`` is used by ``jsd`` only).

    Args:
        student_logits, teacher_logits: ``(B, T, V)``
        mask: ``(B, T)``
    Returns: scalar, mean over unmasked positions.
    """
    if name == "forward_kl":
        return kd_loss(student_logits, teacher_logits, mask, temperature)
    if name == "reverse_kl":
        return reverse_kd_loss(student_logits, teacher_logits, mask, temperature)
    if name == "jsd":
        return jsd_loss(student_logits, teacher_logits, mask, temperature, jsd_beta)
    raise ValueError(f"distill.divergence: expected one of {', '.join(DIVERGENCES)}, got {name!r}")


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
