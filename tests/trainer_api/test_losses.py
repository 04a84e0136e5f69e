"""The loss functions on their own: values, gradients and config validation."""

from __future__ import annotations

import math

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


@pytest.mark.parametrize("loss_fn, reason", [("stable_reinforce", "record_stability_info"), ("gspo", "does not implement")])
def test_losses_the_sdk_names_but_the_service_lacks_are_refused_with_the_reason(loss_fn, reason):
    with pytest.raises(losses.LossConfigError, match=f"unsupported loss_fn '{loss_fn}': .*{reason}.*; supported: cispo, "):
        losses.check_supported(loss_fn)


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
