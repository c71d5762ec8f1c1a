"""deepseek-jax: DeepSeek-V3 in JAX / Flax NNX, numerically equal to the reference implementation."""

from deepseek_jax.cache import Cache, CacheForm
from deepseek_jax.config import BF16, PRESETS, ModelConfig, Runtime
from deepseek_jax.hf import load_hf, save_hf
from deepseek_jax.loss import LossTerms, loss_fn
from deepseek_jax.model import DeepSeekV3, ModelOutput, MTPOutput
from deepseek_jax.router import RouterBias

__all__ = ['PRESETS', 'BF16', 'ModelConfig', 'Runtime', 'DeepSeekV3', 'ModelOutput', 'MTPOutput', 'Cache',
           'CacheForm', 'RouterBias', 'LossTerms', 'loss_fn', 'load_hf', 'save_hf']
