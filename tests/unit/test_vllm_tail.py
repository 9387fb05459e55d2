"""The vLLM generate runner's derived tail (backends/vllm_logprobs.derived_tail) on a peaked teacher.

vLLM returns only the top-k log-probs (fp32); the tail mass is derived from them. When rounding leaves the
top-k holding all the mass (a top-1 log-prob of 0.0 in fp32) the tail used to be -inf, which made reverse KL
and JSD at β=1 +inf and the gradients NaN for the whole step. No vLLM is needed for the function itself.
"""

from __future__ import annotations

import math

import pytest
import torch

from student_trainer.losses import distill_loss
from teacher_server.backends.vllm_logprobs import derived_tail

V, K = 64, 4
FP32_TINY_LOG = math.log(torch.finfo(torch.float32).tiny)


def peaked_rows() -> torch.Tensor:
    """(3, K) fp32 top-k log-probs: a top-1 of exactly 0.0; a sum that rounds over 1; an ordinary row."""
    return torch.tensor(
        [
            [0.0, -20.0, -25.0, -30.0],
            [-1e-8, -18.0, -19.0, -21.0],
            [-0.5, -1.5, -2.5, -3.5],
        ],
        dtype=torch.float32,
    )


def test_tail_is_finite_where_rounding_ate_the_mass():
    top = peaked_rows()
    tail = derived_tail(top)
    assert tail.shape == (3,) and torch.isfinite(tail).all()
    assert tail[:2].tolist() == pytest.approx([FP32_TINY_LOG] * 2)  # the clamp, as documented
    assert torch.exp(tail.float()).gt(0).all()  # the tail mass stays representable in float32


def test_tail_keeps_its_digits_where_there_is_mass():
    top = peaked_rows()[2:]
    want = math.log1p(-sum(math.exp(x) for x in top[0].double().tolist()))
    assert derived_tail(top).item() == pytest.approx(want, rel=1e-12)
    small = torch.tensor([[math.log1p(-1e-6), -40.0]], dtype=torch.float64)  # tail mass 1e-6: no cancellation
    assert derived_tail(small).item() == pytest.approx(math.log(1e-6), rel=1e-6)


@pytest.mark.parametrize("loss, beta", [("reverse_kl", 0.5), ("jsd", 1.0), ("jsd", 0.5), ("forward_kl", 0.5)])
def test_losses_on_a_peaked_teacher_are_finite_with_finite_gradients(loss, beta):
    top = peaked_rows()
    ids = torch.tensor([[3, 7, 1, 9], [5, 2, 8, 11], [0, 1, 2, 3]])
    student = torch.randn(3, V, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = distill_loss(
        student,
        top,
        torch.ones(3, dtype=torch.bool),
        teacher_ids=ids,
        teacher_tail=derived_tail(top).float(),
        loss=loss,
        beta=beta,
    )
    assert torch.isfinite(out.kd_sum), out.kd_sum
    out.kd_sum.backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


def flat_logprobs(positions: list[list[tuple[int, float]]]):
    """A vLLM FlatLogprobs stand-in: per position its (token id, logprob) entries, flattened with indices."""
    from types import SimpleNamespace

    flat = SimpleNamespace(start_indices=[], end_indices=[], token_ids=[], logprobs=[])
    for entries in positions:
        flat.start_indices.append(len(flat.token_ids))
        flat.token_ids += [t for t, _ in entries]
        flat.logprobs += [lp for _, lp in entries]
        flat.end_indices.append(len(flat.token_ids))
    return flat


def test_sampled_positions_are_read_by_their_own_indices_with_or_without_the_sampled_entry():
    """The vLLM generate path: a position of 1 + k entries (the sampled token first) next to one of k, where
    vLLM left out the sampled token because it is among the top-k (seen from vLLM with delta outputs: a
    flat read of fixed width failed with a shape error)."""
    from teacher_server.backends.vllm_logprobs import sample_logprob_tensors

    top0 = [(29, -0.1), (15, -2.0), (51, -3.0), (433, -4.0)]
    top1 = [(181, -0.2), (140, -1.9), (118, -2.9), (29, -3.9)]
    earlier = [[(7, -0.5), (7, -0.5), (8, -1.0), (9, -2.0), (10, -3.0)]]  # a position before this delta
    flat = flat_logprobs([*earlier, [(29, -0.1), *top0], top1])
    ids, lps = sample_logprob_tensors(flat, [29, 181], K)
    assert ids.tolist() == [[29, 29, 15, 51, 433], [181, 181, 140, 118, 29]]
    want = torch.tensor([[-0.1, -0.1, -2.0, -3.0, -4.0], [-0.2, -0.2, -1.9, -2.9, -3.9]])
    torch.testing.assert_close(lps, want)
    with pytest.raises(ValueError, match="do not include the sampled token"):
        sample_logprob_tensors(flat_logprobs([top1]), [999], K)
    with pytest.raises(ValueError, match="expected 5"):
        sample_logprob_tensors(flat_logprobs([top1[:2]]), [181], K)
