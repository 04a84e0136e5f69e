"""The loss functions on their own: values, gradients and config validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from trainer_api import losses  # noqa: E402


def _inputs(sampler_lp, adv):
    return {"logprobs": torch.tensor(sampler_lp), "advantages": torch.tensor(adv)}


def test_cross_entropy_is_weighted_negative_log_likelihood():
    lp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    res = losses.compute_loss("cross_entropy", lp, {"weights": torch.tensor([0.0, 1.0, 2.0])}, {})
    assert res.loss.item() == pytest.approx(8.0)
    res.loss.backward()
    assert lp.grad.tolist() == [0.0, -1.0, -2.0]
    assert losses.loss_metrics("cross_entropy", res.elementwise_loss, lp, {}) == {"loss:sum": pytest.approx(8.0)}


def test_cross_entropy_without_weights_weighs_every_token():
    lp = torch.tensor([-1.0, -2.0])
    assert losses.compute_loss("cross_entropy", lp, {}, {}).loss.item() == pytest.approx(3.0)


def test_importance_sampling_on_policy_gradient_equals_advantage():
    lp = torch.tensor([-1.0, -0.5], requires_grad=True)
    res = losses.compute_loss("importance_sampling", lp, _inputs([-1.0, -0.5], [2.0, -1.0]), {})
    assert res.loss.item() == pytest.approx(-1.0)
    res.loss.backward()
    assert lp.grad.tolist() == pytest.approx([-2.0, 1.0])


def test_ppo_clips_ratio_with_configured_thresholds():
    cfg = losses.resolve_config("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1})
    # ratio e^0.5 ~ 1.65 with a positive advantage: clipped to 1.1, no gradient.
    lp = torch.tensor([-0.5], requires_grad=True)
    res = losses.compute_loss("ppo", lp, _inputs([-1.0], [1.0]), cfg)
    assert res.loss.item() == pytest.approx(-1.1)
    res.loss.backward()
    assert lp.grad.item() == 0.0
    # Inside the trust region the gradient is -ratio * advantage.
    lp2 = torch.tensor([-1.0], requires_grad=True)
    res2 = losses.compute_loss("ppo", lp2, _inputs([-1.0], [1.0]), cfg)
    res2.loss.backward()
    assert lp2.grad.item() == pytest.approx(-1.0)


def test_cispo_keeps_gradient_through_logprob_with_clipped_weight():
    cfg = losses.resolve_config("cispo", {"clip_high_threshold": 1.2})
    lp = torch.tensor([-0.5], requires_grad=True)
    res = losses.compute_loss("cispo", lp, _inputs([-1.0], [1.0]), cfg)
    res.loss.backward()
    assert lp.grad.item() == pytest.approx(-1.2)  # clipped ratio times advantage, not zero


def test_dro_penalises_squared_log_ratio():
    cfg = losses.resolve_config("dro", {"beta": 0.5})
    lp = torch.tensor([-1.0], requires_grad=True)
    res = losses.compute_loss("dro", lp, _inputs([-2.0], [0.0]), cfg)
    assert res.loss.item() == pytest.approx(0.25)  # 0.5 * beta * (1.0)^2
    res.loss.backward()
    assert lp.grad.item() == pytest.approx(0.5)


def test_dro_leaves_prompt_positions_alone():
    """As the SDK sends RL data: prompt positions carry sampler logprob 0 and advantage 0, no mask."""
    cfg = losses.resolve_config("dro", None)
    lp = torch.tensor([-9.0, -7.0, -1.0, -2.0], requires_grad=True)  # two prompt tokens, two sampled
    inputs = _inputs([0.0, 0.0, -1.5, -2.0], [0.0, 0.0, 1.0, 0.0])
    res = losses.compute_loss("dro", lp, inputs, cfg)
    res.loss.backward()
    assert lp.grad[:2].tolist() == [0.0, 0.0] and res.elementwise_loss[:2].tolist() == [0.0, 0.0]
    # Sampled tokens keep both terms, a zero advantage too: -A + beta * log-ratio.
    assert lp.grad[2:].tolist() == pytest.approx([-1.0 + 0.05 * 0.5, 0.0])
    assert res.loss.item() == pytest.approx(1.0 + 0.5 * 0.05 * 0.25)


def test_the_importance_ratio_covers_sampled_positions_only():
    lp = torch.tensor([-9.0, -1.0, -3.0])
    inputs = _inputs([0.0, -1.0, -2.0], [0.0, 0.0, 1.0])  # a prompt token, then two sampled (one with A = 0)
    res = losses.compute_loss("importance_sampling", lp, inputs, {})
    metrics = losses.loss_metrics("importance_sampling", res.elementwise_loss, lp, inputs)
    assert metrics["importance_ratio:mean"] == pytest.approx((1.0 + math.exp(-1.0)) / 2)


def test_stable_reinforce_which_the_sdk_names_but_the_service_lacks_is_refused_with_the_reason():
    with pytest.raises(losses.LossConfigError, match="unsupported loss_fn 'stable_reinforce': .*record_stability_info"
                                                     ".*; supported: cispo, cross_entropy, dro, gspo, "):
        losses.check_supported("stable_reinforce")


def _gspo_reference(lp, sampler_lp, adv, mask, rows, low, high):
    """GSPO-token written out per sequence with Python loops, straight from its definition: each
    sequence's ratio s = exp(mean of (lp - sampler_lp) over its marked tokens), and every token's
    objective min(s_t A_t, clip(s_t) A_t), where s_t has s's value and d s_t / d lp_t = s."""
    total = torch.zeros((), dtype=lp.dtype)
    for row in sorted(set(rows)):
        idx = [t for t, r in enumerate(rows) if r == row]
        marked = [t for t in idx if mask[t]]
        s = torch.exp(sum(lp[t].detach() - sampler_lp[t] for t in marked) / len(marked))
        for t in idx:
            s_t = s * torch.exp(lp[t] - lp[t].detach())
            total = total - torch.min(s_t * adv[t], torch.clamp(s_t, low, high) * adv[t])
    return total


def test_gspo_gradients_match_a_reference_written_per_sequence_in_float64():
    torch.manual_seed(0)
    rows = [0] * 5 + [1] * 4 + [2] * 6  # three datums of a merged batch
    n = len(rows)
    lp = (-torch.rand(n, dtype=torch.float64) * 3).requires_grad_(True)
    sampler_lp = lp.detach() + torch.randn(n, dtype=torch.float64) * 0.3  # off-policy, some sequences clip
    adv = torch.randn(n, dtype=torch.float64)
    mask = torch.rand(n) > 0.3
    for r in range(3):  # every sequence marks at least one token
        mask[rows.index(r)] = True
    inputs = {"logprobs": sampler_lp, "advantages": adv, "sequence_ratio_mask": mask.to(torch.float64),
              losses.DATUM_INDEX: torch.tensor(rows)}
    cfg = losses.resolve_config("gspo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1})
    ours = losses.compute_loss("gspo", lp, inputs, cfg).loss
    (grad,) = torch.autograd.grad(ours, lp)
    ref = _gspo_reference(lp, sampler_lp, adv, mask.tolist(), rows, 0.9, 1.1)
    (ref_grad,) = torch.autograd.grad(ref, lp)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    ratios = [math.exp(float((lp.detach() - sampler_lp)[[t for t in range(n) if rows[t] == r and mask[t]]].mean()))
              for r in range(3)]
    assert any(not 0.9 <= s <= 1.1 for s in ratios) and any(0.9 <= s <= 1.1 for s in ratios), ratios


@pytest.mark.parametrize("log_ratio, advantage, clipped", [
    (0.3, 1.0, True),    # above the high threshold, advantage > 0: the sequence is dropped
    (0.3, -1.0, False),  # above it, advantage < 0: the unclipped (larger) penalty is kept
    (-0.3, -1.0, True),  # below the low threshold, advantage < 0: dropped
    (-0.3, 1.0, False),  # below it, advantage > 0: kept
    (0.05, 1.0, False),  # inside the trust region: kept
])
def test_gspo_clips_whole_sequences_at_both_thresholds(log_ratio, advantage, clipped):
    cfg = losses.resolve_config("gspo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})
    # Per-token log-ratios differ (one would clip alone, one not); their mean, log_ratio, decides for all.
    sampler_lp = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    lp = (sampler_lp + torch.tensor([log_ratio - 0.25, log_ratio + 0.25], dtype=torch.float64)).requires_grad_(True)
    inputs = {"logprobs": sampler_lp, "advantages": torch.tensor([advantage] * 2, dtype=torch.float64)}
    res = losses.compute_loss("gspo", lp, inputs, cfg)
    res.loss.backward()
    s = math.exp(log_ratio)
    if clipped:
        assert lp.grad.tolist() == [0.0, 0.0]
        assert res.loss.item() == pytest.approx(-2 * min(max(s, 0.8), 1.2) * advantage)
    else:
        assert lp.grad.tolist() == pytest.approx([-s * advantage] * 2, rel=1e-12)
        assert res.loss.item() == pytest.approx(-2 * s * advantage)


def test_gspo_prompt_positions_contribute_nothing():
    """As the SDK sends RL data (no mask): prompt positions carry sampler logprob 0 and advantage 0."""
    cfg = losses.resolve_config("gspo", None)
    lp = torch.tensor([-9.0, -7.0, -1.0, -2.0], dtype=torch.float64, requires_grad=True)
    sampler_lp = torch.tensor([0.0, 0.0, -1.2, -2.1], dtype=torch.float64)
    res = losses.compute_loss("gspo", lp, {"logprobs": sampler_lp,
                                           "advantages": torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)}, cfg)
    res.loss.backward()
    assert lp.grad[:2].tolist() == [0.0, 0.0] and res.elementwise_loss[:2].tolist() == [0.0, 0.0]
    s = math.exp(0.15)  # the mean log-ratio of the two sampled tokens only; the prompt's -8 would clip it
    assert lp.grad[2:].tolist() == pytest.approx([-s, -s], rel=1e-12)
    # The default mask is the sampled positions, as default_input gives the engine for a datum that omits it.
    numpy_inputs = {"logprobs": sampler_lp.numpy(), "advantages": np.array([0.0, 0.0, 1.0, 1.0])}
    assert losses.default_input("sequence_ratio_mask", numpy_inputs, 4).tolist() == [0.0, 0.0, 1.0, 1.0]
    # A datum of prompt only gets ratio 1 and no loss, not a NaN from an empty mean.
    empty = losses.compute_loss("gspo", lp, {"logprobs": torch.zeros(4, dtype=torch.float64),
                                             "advantages": torch.zeros(4, dtype=torch.float64)}, cfg)
    assert empty.loss.item() == 0.0


def test_gspo_thresholds_are_validated_as_ratio_bounds():
    assert losses.resolve_config("gspo", None) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    with pytest.raises(losses.LossConfigError, match="clip thresholds"):
        losses.resolve_config("gspo", {"clip_low_threshold": 1.001})


def test_metrics_keys_carry_a_reduction():
    lp = torch.tensor([-1.0, -1.0])
    res = losses.compute_loss("ppo", lp, _inputs([-1.0, -1.0], [1.0, 1.0]), losses.resolve_config("ppo", None))
    metrics = losses.loss_metrics("ppo", res.elementwise_loss, lp, _inputs([-1.0, -1.0], [1.0, 1.0]))
    assert all(":" in key for key in metrics)
    assert metrics["importance_ratio:mean"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "loss_fn, config, message",
    [
        ("nope", {}, "unsupported loss_fn"),
        ("ppo", {"clip_eps": 0.2}, "not used by 'ppo'"),
        ("ppo", {"clip_low_threshold": "low"}, "must be a number"),
        ("ppo", {"clip_low_threshold": 1.5}, "clip thresholds"),
        ("cross_entropy", {"beta": 1.0}, "accepted keys: none"),
    ],
)
def test_bad_configs_are_rejected_with_a_clear_message(loss_fn, config, message):
    with pytest.raises(losses.LossConfigError, match=message):
        losses.resolve_config(loss_fn, config)


def test_missing_inputs_are_named():
    with pytest.raises(losses.LossConfigError, match="advantages"):
        losses.compute_loss("ppo", torch.zeros(1), {"logprobs": torch.zeros(1)}, losses.resolve_config("ppo", None))


def test_defaults_are_ratio_bounds():
    cfg = losses.resolve_config("ppo", None)
    assert cfg == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert math.isclose(losses.resolve_config("dro", None)["beta"], 0.05)
