r"""Quality of the 4-bit weight formats (deepseek_jax/quant4.py) on the trained demo run's validation split.

  python bench/quant4_quality.py [--workdir=runs/demo --batches=8]

The routed experts' weights (w1, w2, w3 of every MoE layer and the MTP block) are replaced by their 4-bit
round trip, dequantize(quantize(w)), which is exactly what a model holding the packed codes computes with;
everything else stays as trained (fp32). Reported per format and group size against the unquantized run:
next-token cross entropy on the validation windows, its change, the mean KL divergence of the next-token
distributions KL(p_fp32 || p_4bit), top-1 agreement, and the stored bytes per quantized parameter. Writes the
"4-bit weight formats: quality on the demo run" section of docs/benchmarks.md.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.report import replace_section  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'A trained run (launch/train.py --config=configs/demo.py).')
_BATCHES = flags.DEFINE_integer('batches', 8, 'Validation batches of the run\'s eval_batch_size.')

FORMATS = (('int4', 32), ('int4', 64), ('int4', 128), ('mxfp4', 32))


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from configs import demo
  from deepseek_jax import data, quant4
  from deepseek_jax.trainer import restore_model
  config = demo.get_config()
  cfg, model, step = restore_model(_WORKDIR.value)
  corpus = data.prepare(config.data, os.path.join(_WORKDIR.value, 'data'))
  batches = data.validation_batches(corpus.val, config.seq_len, config.eval_batch_size, _BATCHES.value,
                                    cfg.vocab_size)
  graphdef, state = nnx.split(model)

  @jax.jit
  def log_probs(state, tokens_BS):
    return jax.nn.log_softmax(nnx.merge(graphdef, state)(tokens_BS[:, :-1]).astype(jnp.float32), axis=-1)

  def experts(state):
    return [(path, v) for path, v in nnx.to_flat_state(state) if 'experts' in path and path[-1] in ('w1', 'w2', 'w3')]

  reference = [log_probs(state, jnp.asarray(b)) for b in batches]
  targets = [jnp.asarray(b[:, 1:]) for b in batches]
  ce = lambda outs: float(np.mean([-jnp.take_along_axis(o, t[..., None], -1).mean() for o, t in zip(outs, targets)]))
  base = ce(reference)
  n_quantized = sum(v.size for _, v in experts(state))
  rows = [f'| none (fp32, as trained) | 4 | {base:.4f} | - | - | - |']
  for fmt, group in FORMATS:
    flat = dict(nnx.to_flat_state(state))
    stored = 0
    for path, variable in experts(state):
      w = variable[...]
      packed = quant4.quantize(w, fmt, group)
      stored += quant4.bytes_per_parameter(packed) * w.size
      flat[path] = variable.replace(quant4.dequantize(packed, fmt, w.dtype))
    quantized = nnx.from_flat_state(flat)
    outs = [log_probs(quantized, jnp.asarray(b)) for b in batches]
    kl = float(np.mean([(jnp.exp(r) * (r - o)).sum(-1).mean() for r, o in zip(reference, outs)]))
    top1 = float(np.mean([(r.argmax(-1) == o.argmax(-1)).mean() for r, o in zip(reference, outs)]))
    value = ce(outs)
    rows.append(f'| {fmt}, group {group} | {stored / n_quantized:.4f} | {value:.4f} | {(value / base - 1):+.2%} | '
                f'{kl:.5f} | {top1:.2%} |')
  tokens = sum(t.size for t in targets)
  body = '\n'.join([
      f'Command: `python bench/quant4_quality.py --workdir={_WORKDIR.value} --batches={_BATCHES.value}` (jax '
      f'{jax.__version__}): the demo run at step {step}, {n_quantized / 1e6:.2f}M routed-expert parameters '
      f'quantized (of {sum(v.size for _, v in nnx.to_flat_state(state)) / 1e6:.2f}M), {tokens:,} validation '
      'tokens. int4 scales in bfloat16. KL: mean over tokens of KL(fp32 || 4-bit) in nats; top-1: the argmax '
      'tokens that agree.',
      '',
      '| routed experts | bytes / parameter | validation CE | change | KL | top-1 agreement |',
      '|---|---|---|---|---|---|',
      *rows,
  ])
  print(body)
  replace_section('4-bit weight formats: quality on the demo run', body)


if __name__ == '__main__':
  app.run(main)
