"""The constraint loss keeps experts from collapsing: it is low when users route apart and pushes them apart."""

import torch

from proper_fed.model.routing import constraint_loss, per_user_routing


def _gates(per_user: list[list[float]], tokens: int = 3) -> torch.Tensor:
    # one batch row per user, the same routing on every token: (B, T, k)
    return torch.tensor(per_user).unsqueeze(1).expand(-1, tokens, -1).clone()


def test_lower_when_users_route_to_different_experts():
    mask = torch.ones(2, 3)
    users = torch.tensor([1, 2])
    apart = constraint_loss([_gates([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]])], mask, users)
    together = constraint_loss([_gates([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05]])], mask, users)
    assert apart < together
    assert together.item() == torch.tensor(1.0).item() or abs(together.item() - 1.0) < 1e-6


def test_gradient_pushes_users_routing_apart():
    logits = torch.tensor([[[1.0, 0.5, 0.0]], [[0.8, 0.6, 0.0]]], requires_grad=True)  # (B=2, T=1, k)
    users, mask = torch.tensor([1, 2]), torch.ones(2, 1)
    before = constraint_loss([logits.softmax(-1)], mask, users)
    before.backward()
    with torch.no_grad():
        stepped = logits - 0.5 * logits.grad
    after = constraint_loss([stepped.softmax(-1)], mask, users)
    assert after < before
    v0, v1 = stepped.softmax(-1)[:, 0]
    u0, u1 = logits.detach().softmax(-1)[:, 0]
    assert (v0 - v1).abs().sum() > (u0 - u1).abs().sum()  # the two users' routing moved apart


def test_rows_of_one_user_are_averaged_and_unknown_rows_ignored():
    g = _gates([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    mask = torch.ones(3, 3)
    per = per_user_routing(g, mask, torch.tensor([7, 7, 9]))
    torch.testing.assert_close(per, torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    # a single known user (the rest unknown, row 0): nothing to push apart
    assert constraint_loss([g], mask, torch.tensor([3, 0, 0])).item() == 0.0


def test_padding_tokens_do_not_count():
    g = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])  # (2, 2, 2)
    mask = torch.tensor([[1, 0], [1, 1]])
    per = per_user_routing(g, mask, torch.tensor([1, 2]))
    torch.testing.assert_close(per, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
