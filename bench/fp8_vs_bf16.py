r"""FP8 against BF16 training on the demo: loss gap, step time, weight and saved-activation bytes.

Trains configs/demo.py twice on the same data, seed and steps, once with bf16 activations (fp32 master
weights) and once adding the FP8 recipe (`runtime.quant='fp8'`), then reports the relative gap of the smoothed
training loss (mean next-token CE over the last 20% of steps) and of the final validation loss (the paper
reports < 0.25% at scale), median step time, the bytes of the GEMM weight operands and of the activations
saved for the backward pass, and plots both loss curves.

  python bench/fp8_vs_bf16.py [--steps=260]

Writes docs/fp8_vs_bf16.png and the "FP8 against BF16" section of docs/benchmarks.md.
"""

import os
import shutil
import statistics
import sys
import tempfile

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.report import PATH as REPORT, replace_section  # noqa: E402
from deepseek_jax.metrics import plot_loss_curve, read_metrics  # noqa: E402

_STEPS = flags.DEFINE_integer('steps', 260, 'Training steps per run.')


def run_config(quant: str, steps: int):
  from configs import demo
  config = demo.get_config()
  config.steps = steps
  config.runtime.dtype = 'bfloat16'
  config.runtime.quant = quant
  config.log_every = 50
  return config


def train(config, workdir: str):
  from deepseek_jax.trainer import train as train_run
  result = train_run(config, workdir)
  return result, read_metrics(os.path.join(workdir, 'metrics.jsonl'))


def memory(config):
  """(GEMM weight-operand bytes, saved-activation bytes by dtype) of one training step, from shapes only."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from deepseek_jax.layers import Linear
  from deepseek_jax.loss import loss_fn
  from deepseek_jax.model import DeepSeekV3
  from deepseek_jax.moe import RoutedExperts
  from deepseek_jax.run_config import model_config, runtime

  cfg, rt = model_config(config), runtime(config)
  model = nnx.eval_shape(lambda: DeepSeekV3(cfg, rt, nnx.Rngs(0)))
  weight_elems = 0
  for _, module in nnx.iter_graph(model):  # every projection and expert: what the FP8 recipe quantizes
    if isinstance(module, Linear) and module is not model.head:
      weight_elems += int(np.prod(module.kernel.shape))
    elif isinstance(module, RoutedExperts):
      weight_elems += sum(int(np.prod(w.shape)) for w in (module.w1, module.w2, module.w3))
  # FP8: one byte per weight plus a 4-byte scale per 128 x 128 block; BF16: two bytes per weight.
  weight_bytes = weight_elems * (1 + 4 / 128**2) if rt.quant == 'fp8' else weight_elems * 2
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jax.ShapeDtypeStruct((config.batch_size, config.seq_len + 1), jnp.int32)

  from jax._src.ad_checkpoint import saved_residuals  # what print_saved_residuals prints, as data
  by_dtype = {}
  loss = lambda p, r, t: loss_fn(nnx.merge(graphdef, p, r), t).total
  for aval, source in saved_residuals(loss, params, rest, tokens):
    if source.startswith('from the argument'):
      continue  # the weights themselves: alive anyway, not activation memory
    by_dtype[str(aval.dtype)] = by_dtype.get(str(aval.dtype), 0) + int(np.prod(aval.shape)) * aval.dtype.itemsize
  return weight_bytes, by_dtype


def main(argv):
  del argv
  import jax
  logging.set_verbosity(logging.WARNING)
  steps = _STEPS.value
  root = tempfile.mkdtemp(prefix='fp8_vs_bf16_')
  runs = {}
  for quant in ('none', 'fp8'):
    config = run_config(quant, steps)
    workdir = os.path.join(root, quant)
    if runs:  # same tokenizer and token files: copy the first run's data instead of re-encoding
      shutil.copytree(os.path.join(root, 'none', 'data'), os.path.join(workdir, 'data'))
    result, records = train(config, workdir)
    runs[quant] = (config, result, records)
  tail = max(1, steps // 5)
  rows = []
  for quant, (config, result, records) in runs.items():
    ce = np.array([r['ce'] for r in records])
    weight_bytes, saved = memory(config)
    step_s = statistics.median(r['step_seconds'] for r in records[5:])
    rows.append((quant, float(ce[-tail:].mean()), result.val_loss, step_s, weight_bytes, saved))
  (_, t_bf, v_bf, *_), (_, t_f8, v_f8, *_) = rows
  plot_loss_curve({'BF16' if q == 'none' else 'FP8': runs[q][2] for q in runs},
                  os.path.join(os.path.dirname(REPORT), 'fp8_vs_bf16.png'), smooth=10)
  mib = lambda b: f'{b / 2**20:.2f} MiB'
  table = [f'| {"BF16" if q == "none" else "FP8 recipe"} | {t:.4f} | {v:.4f} | {s * 1e3:.0f} ms | {mib(w)} | '
           f'{mib(sum(saved.values()))} ({", ".join(f"{k} {mib(b)}" for k, b in sorted(saved.items()))}) |'
           for q, t, v, s, w, saved in rows]
  text = '\n'.join([
      f'Command: `python bench/fp8_vs_bf16.py --steps={steps}` ({os.cpu_count()} CPU cores, jax '
      f'{jax.__version__}). Both runs: '
      f'configs/demo.py, {steps} steps of {runs["none"][0].batch_size} x {runs["none"][0].seq_len} tokens, the '
      'same seed and batches, bf16 activations with fp32 master weights and bf16 Adam moments; the FP8 run adds '
      "`runtime.quant='fp8'` (e4m3, 1x128 activation / 128x128 weight scales, all three GEMMs of every projection and "
      'expert; the head, router, norms and attention core stay high precision). On CPU the FP8 GEMMs are '
      'emulated by XLA (dequantize, fp32 matmul), so the step time measures the quantization overhead, not '
      'FP8 hardware.',
      '',
      f'| run | train CE, mean of last {tail} steps | validation CE | median step | GEMM weight operands | '
      'saved activations per step |',
      '|---|---|---|---|---|---|',
      *table,
      '',
      f'Relative gap, FP8 vs BF16: training loss {100 * (t_f8 / t_bf - 1):+.3f}%, validation loss '
      f'{100 * (v_f8 / v_bf - 1):+.3f}% (paper: below 0.25%). Curves: `docs/fp8_vs_bf16.png`.',
  ])
  print(text)
  replace_section('FP8 against BF16', text)


if __name__ == '__main__':
  app.run(main)
