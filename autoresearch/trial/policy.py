"""The trial's LoRA adapter on the training service, through the official tinker SDK.

tinker is imported when a Policy is made, not with this module: the
controller imports the objective's module to check it, and its read-only
commands need no SDK.
"""

from __future__ import annotations

from typing import Any, Sequence

from env.text2sql import Example
from env.text2sql.prompts import format_prompt

from ..params import TrialParams
from . import service_routes
from .grpo import Datum
from .service_routes import TrainingServiceError

ANSWER_END = "<end_of_turn>"
FINAL_LR_FRACTION = 0.1


def open_policy(trainer_url: str, api_key: str, base_model: str | None, hp: TrialParams) -> "Policy":
    """A :class:`Policy`, with the SDK's connection and authentication failures as one-line TrainingServiceErrors."""
    import tinker

    try:
        return Policy(trainer_url, api_key, base_model, hp)
    except (tinker.AuthenticationError, tinker.PermissionDeniedError) as error:
        raise TrainingServiceError(f"the training service at {trainer_url} refused the API key "
                                   f"({type(error).__name__}: {_first_line(error)})") from None
    except (tinker.APIConnectionError, tinker.APITimeoutError) as error:
        raise TrainingServiceError(f"the training service at {trainer_url} cannot be reached "
                                   f"({type(error).__name__}: {_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


class Policy:
    """The adapter, its optimizer's schedule, and the tokenizer to talk to it."""

    def __init__(self, trainer_url: str, api_key: str, base_model: str | None, hp: TrialParams) -> None:
        import tinker

        self.types = tinker.types
        client = tinker.ServiceClient(base_url=trainer_url, api_key=api_key)
        if base_model is None:  # the one model a local service serves
            capabilities = tinker.RestClient(base_url=trainer_url, api_key=api_key).get_server_capabilities().result()
            base_model = capabilities.supported_models[0].model_name
        self.training = client.create_lora_training_client(base_model=base_model, rank=hp.lora_rank, seed=hp.seed).result()
        self.tokenizer = self.training.get_tokenizer()
        self.hp = hp
        self.steps_taken = 0
        self._url, self._api_key = trainer_url, api_key

    @property
    def model_id(self) -> str:
        return self.training.model_id

    def device_usage(self) -> dict[str, Any]:
        """See :func:`service_routes.device_usage`."""
        return service_routes.device_usage(self._url, self._api_key, self.model_id)

    def release(self) -> None:
        """See :func:`service_routes.unload_model`."""
        service_routes.unload_model(self._url, self._api_key, self.model_id)

    def sampling_client(self) -> Any:
        """A sampling client on the adapter's current weights (a frozen snapshot the service keeps)."""
        return self.training.save_weights_and_get_sampling_client().result()

    def save_checkpoint(self, name: str) -> str:
        """Save the weights for sampling under ``name``; the checkpoint's ``tinker://`` path."""
        return self.training.save_weights_for_sampler(name).result().path

    def prompt_tokens(self, example: Example) -> list[int]:
        return self.tokenizer.encode(format_prompt(example, self.tokenizer), add_special_tokens=False)

    def answer_tokens(self, example: Example) -> list[int]:
        """The gold query formatted as the model should answer, for the SFT warm-up."""
        return self.tokenizer.encode(f"```sql\n{example.gold}\n```{ANSWER_END}", add_special_tokens=False)

    def learning_rate(self) -> float:
        """``learning_rate`` is the peak of a schedule that decays linearly to FINAL_LR_FRACTION of it over the
        trial's ``sft_steps + rl_steps`` optimizer steps. Measured on the tiny study: at a constant rate the
        warm-up ended noisy (greedy answers flipped from step to step) and the first RL steps undid it."""
        total = self.hp.sft_steps + self.hp.rl_steps
        progress = min(self.steps_taken / max(total - 1, 1), 1.0)
        return self.hp.learning_rate * (1.0 - (1.0 - FINAL_LR_FRACTION) * progress)

    def step(self, data: Sequence[Datum], loss: str, config: dict[str, float] | None) -> dict[str, float]:
        """One forward-backward and one optimizer step; the service's metrics."""
        types = self.types
        batch = [types.Datum(model_input=types.ModelInput.from_ints(d.model_input), loss_fn_inputs=d.loss_fn_inputs)
                 for d in data]
        result = self.training.forward_backward(batch, loss, config)
        optim = self.training.optim_step(types.AdamParams(learning_rate=self.learning_rate()))
        self.steps_taken += 1
        metrics = result.result().metrics
        optim.result()
        return metrics

    def sample(self, sampler: Any, prompts: Sequence[list[int]], n: int, temperature: float, seed: int) -> list[list[Any]]:
        """``n`` completions per prompt (tinker SampledSequences), all requested before any is awaited."""
        types = self.types
        params = [types.SamplingParams(max_tokens=self.hp.max_tokens, temperature=temperature, seed=seed + i, stop=[ANSWER_END])
                  for i in range(len(prompts))]
        futures = [sampler.sample(types.ModelInput.from_ints(p), n, sp) for p, sp in zip(prompts, params)]
        return [f.result().sequences for f in futures]

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
