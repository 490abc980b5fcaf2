"""Each KD divergence against a hand computation (plain Python math) on small tensors."""

import math

import pytest
import torch

from toolkit.distill.losses import LOSSES, forward_kl, generalized_jsd, mix, reverse_kl

STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 0.0, 1.0], [0.5, 0.5, 0.5]]


def softmax(row, t=1.0):
    e = [math.exp(x / t) for x in row]
    return [x / sum(e) for x in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def hand(kind, t=1.0, beta=0.5):
    vals = []
    for s_row, t_row in zip(STUDENT, TEACHER):
        p, q = softmax(t_row, t), softmax(s_row, t)
        if kind == "forward_kl":
            vals.append(kl(p, q))
        elif kind == "reverse_kl":
            vals.append(kl(q, p))
        else:
            m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
            vals.append(beta * kl(p, m) + (1 - beta) * kl(q, m))
    return sum(vals) / len(vals) * t * t


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergence_matches_hand_computation(kind, temperature):
    got = LOSSES[kind](torch.tensor(STUDENT), torch.tensor(TEACHER), temperature=temperature, beta=0.3)
    assert float(got) == pytest.approx(hand(kind, temperature, beta=0.3), rel=1e-5)


def test_divergences_are_zero_for_identical_distributions_and_positive_otherwise():
    x = torch.tensor(STUDENT)
    for fn in (forward_kl, reverse_kl, generalized_jsd):
        assert float(fn(x, x)) == pytest.approx(0.0, abs=1e-6)
        assert float(fn(x, torch.tensor(TEACHER))) > 0.01


def test_jsd_at_half_is_symmetric_and_kls_are_not():
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    assert float(generalized_jsd(s, t, beta=0.5)) == pytest.approx(float(generalized_jsd(t, s, beta=0.5)), rel=1e-6)
    assert float(forward_kl(s, t)) != pytest.approx(float(reverse_kl(s, t)), rel=1e-3)


def test_kd_gradient_flows_to_student_only():
    s = torch.tensor(STUDENT, requires_grad=True)
    t = torch.tensor(TEACHER, requires_grad=True)
    forward_kl(s, t.detach()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_mix_weights_kd_and_sft():
    assert float(mix(torch.tensor(2.0), torch.tensor(4.0), 0.25)) == pytest.approx(0.25 * 2 + 0.75 * 4)
