"""Shared test utilities."""

import numpy as np
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import Runtime
from deepseek_jax.model import DeepSeekV3


def randomize(module, seed: int = 0, bias_std: float = 0.2):
  """Gives every Variable non-trivial values in place: weights N(0, 1/fan_in) (so activations neither vanish
  nor saturate through the depth), norm scales 1 + N(0, 0.2^2), router biases N(0, bias_std^2).

  Values come from numpy: XLA:CPU spends ~0.1 s compiling each differently shaped jax.random call.
  """
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(module)):
    noise = rng.standard_normal(var.shape, dtype=np.float32)
    if path[-1] == 'bias':
      value = bias_std * noise
    elif path[-1] == 'scale':
      value = 1 + 0.2 * noise
    elif path[-1] == 'embedding':
      value = noise
    else:
      value = noise / np.sqrt(var.shape[-2])
    var.set_value(jnp.asarray(value, var.dtype))
  return module


def random_model(cfg, seed: int = 0, rt: Runtime = Runtime(), **kwargs) -> DeepSeekV3:
  """A DeepSeekV3 with `randomize`d values, built without running (and compiling) the initializers."""
  return randomize(nnx.eval_shape(lambda: DeepSeekV3(cfg, rt, nnx.Rngs(0))), seed, **kwargs)


@nnx.jit
def forward(model, tokens_BT):
  """model.forward under jit (tests run many small models; eager dispatch would dominate)."""
  return model.forward(tokens_BT)


def next_tokens(tokens_BT):
  """The token after each position, 0 after the last: what MTP depth 1 reads when the inputs are tokens_BT."""
  return jnp.pad(tokens_BT[:, 1:], ((0, 0), (0, 1)))


@nnx.jit
def mtp_forward(model, tokens_BT):
  return model.mtp_forward(next_tokens(tokens_BT), model.forward(tokens_BT).hidden_BTD)


def require(module: str):
  """Imports an optional test dependency (the `test` extra). When it is missing the test run fails if
  DEEPSEEK_JAX_REQUIRE_EXTRAS=1 (.ci/run sets it: the parity tests against transformers are the project's
  main evidence and must run in CI), and otherwise the tests skip with a reason naming the module (pytest
  prints skip reasons: -rs in pyproject.toml)."""
  import importlib
  import os

  import pytest
  try:
    return importlib.import_module(module)
  except ImportError as error:
    if os.environ.get('DEEPSEEK_JAX_REQUIRE_EXTRAS') == '1':
      raise ImportError(f'{module} is required here (DEEPSEEK_JAX_REQUIRE_EXTRAS=1): '
                        "pip install -e '.[test]'") from error
    pytest.skip(f"{module} is not installed (pip install -e '.[test]'): skipping the tests that need it",
                allow_module_level=True)
