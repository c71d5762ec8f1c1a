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


def random_hf_model(vocab_size: int = 300):
  """A random transformers DeepseekV3ForCausalLM (eval mode): 3 layers (1 dense), 8 experts top-2 in 4 groups
  (top-2 groups), a shared expert, q_lora, router biases N(0, 0.1^2), no MTP and no special tokens; weights
  N(0, 1/fan_in), norm scales 1 + N(0, 0.2^2), drawn after torch.manual_seed(0)."""
  torch, transformers = require('torch'), require('transformers')
  config = transformers.DeepseekV3Config(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
      first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
      num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1, q_lora_rank=32, kv_lora_rank=24,
      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=128,
      num_nextn_predict_layers=0, eos_token_id=None, bos_token_id=None, pad_token_id=None)
  torch.manual_seed(0)
  model = transformers.DeepseekV3ForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1 + 0.2 * torch.randn_like(p) if 'norm' in name else torch.randn_like(p) / p.shape[-1] ** 0.5)
    for layer in model.model.layers[1:]:
      layer.mlp.gate.e_score_correction_bias.copy_(0.1 * torch.randn(8))
  return model


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


def require_native():
  """The native CPU kernels (cpu_kernels.py), built on first use with the machine's C++ compiler: the CPU's
  default decode path, so CI (DEEPSEEK_JAX_REQUIRE_EXTRAS=1) fails without them; elsewhere the test skips
  with the reason."""
  import os

  import pytest

  from deepseek_jax import cpu_kernels
  if cpu_kernels.available():
    return
  if os.environ.get('DEEPSEEK_JAX_REQUIRE_EXTRAS') == '1':
    raise RuntimeError('the native CPU kernels are required here (DEEPSEEK_JAX_REQUIRE_EXTRAS=1) and could not '
                       'be built: see the warning logged by deepseek_jax.cpu_kernels')
  pytest.skip('the native CPU kernels could not be built here (no C++ compiler?): skipping')
