"""Logit-distillation divergences between teacher and student next-token distributions.

All functions take logits of shape [N, V] for the N positions that carry loss (the caller selects them) and
return the mean over positions. V is either the full vocabulary (online teacher) or the teacher's top-k
token ids (precomputed): then both distributions are renormalized over those k ids, which keeps every
divergence a proper divergence on that support.

- forward KL(p_T || p_S): mode-covering, the classic Hinton KD.
- reverse KL(p_S || p_T): mode-seeking (MiniLLM).
- generalized JSD_beta (GKD, Agarwal et al. 2024): M = beta p_T + (1 - beta) p_S,
  JSD = beta KL(p_T || M) + (1 - beta) KL(p_S || M); interpolates between the two KLs.
Softmax temperature T divides both logits; the loss is multiplied by T^2 so gradient scale does not
depend on T (Hinton et al. 2015).
"""

from __future__ import annotations

import math


def _log_probs(student_logits, teacher_logits, temperature: float):
    import torch.nn.functional as F

    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return s, t


def _kl(log_p, log_q):
    """KL(p || q) per row, from log-probabilities; 0 * log 0 terms count as 0."""
    import torch

    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def forward_kl(student_logits, teacher_logits, temperature: float = 1.0, beta: float = 0.5):
    s, t = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(t, s).mean() * temperature ** 2


def reverse_kl(student_logits, teacher_logits, temperature: float = 1.0, beta: float = 0.5):
    s, t = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(s, t).mean() * temperature ** 2


def generalized_jsd(student_logits, teacher_logits, temperature: float = 1.0, beta: float = 0.5):
    import torch

    s, t = _log_probs(student_logits, teacher_logits, temperature)
    # log M computed in log space: log(beta e^t + (1 - beta) e^s)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
    return (beta * _kl(t, m) + (1 - beta) * _kl(s, m)).mean() * temperature ** 2


LOSSES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
}


def mix(kd, sft, ratio: float):
    """ratio * KD + (1 - ratio) * SFT (ratio = 1: pure logit KD; 0: pure sequence-level KD)."""
    return ratio * kd + (1 - ratio) * sft
