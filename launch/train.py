r"""Training launcher (absl). The trainer arrives with issue [2/5]; today it builds the configured model,
reports its size and prints a greedy sample.

  python -m launch.train --config=configs/demo.py --workdir=runs/demo [--config.seed=1]
"""

import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from deepseek_jax import cost
from deepseek_jax.config import PRESETS
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.sampling import greedy_rollout

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')


def main(argv):
  del argv
  config = _CONFIG.value
  cfg = PRESETS[config.model]
  start = time.time()
  model = nnx.jit(DeepSeekV3, static_argnums=0)(cfg, nnx.Rngs(config.seed))
  summary = cost.summary(cfg)
  print(f'{config.model}: {summary["total_params"] / 1e6:.2f}M parameters, '
        f'{summary["active_params"] / 1e6:.2f}M active per token, {summary["mtp_params"] / 1e6:.2f}M in MTP '
        f'(built in {time.time() - start:.1f}s on {jax.devices()[0].platform})')
  sample = greedy_rollout(model, jnp.zeros((1, 1), jnp.int32), config.sample_tokens)
  print('greedy sample (token ids, untrained model):', sample[0].tolist())


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
