r"""Decoding throughput: ours against transformers' generate(), absorbed latent against naive per-head cache,
MTP speculative against plain decoding on the trained demo model.

  python bench/decode.py [--workdir=runs/demo --new_tokens=64 --repeats=3]

The first two comparisons use one random model with the demo's shapes, loaded by both frameworks from the
same checkpoint, greedy, equal-length prompts; the third decodes from the trained demo run (trained first
when --workdir does not hold one). Tokens/s = new tokens of all rows / wall time of generate() including the
prefill, median of --repeats runs after a warm-up run (compilation excluded). Writes the "Decoding" section
of docs/benchmarks.md.
"""

import os
import statistics
import sys
import tempfile
import time

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.report import replace_section  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'A trained demo run (trained here if missing).')
_NEW = flags.DEFINE_integer('new_tokens', 64, 'Tokens generated per row.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs (median reported) after one warm-up run.')


def timed(fn):
  fn()  # warm-up: compilation / allocator
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), result


def random_checkpoint(path):
  """A transformers DeepseekV3 with the demo's shapes and random weights, saved for both frameworks."""
  import torch
  import transformers
  from configs import demo
  from deepseek_jax.hf_config import to_hf
  from deepseek_jax.run_config import model_config
  c = model_config(demo.get_config()).replace(n_mtp_layers=0)
  config = transformers.DeepseekV3Config(**to_hf(c), eos_token_id=None, bos_token_id=None,
                                         pad_token_id=None)  # no stop token: every run generates all new tokens
  torch.manual_seed(0)
  model = transformers.DeepseekV3ForCausalLM(config).eval()
  model.save_pretrained(path)
  return c, model


def main(argv):
  del argv
  import jax
  import torch
  from configs import demo
  from deepseek_jax import cost
  from deepseek_jax.cache import CacheForm, bytes_per_token
  from deepseek_jax.generate import generate
  from deepseek_jax.hf import load_hf
  from deepseek_jax.run_config import runtime
  from deepseek_jax.trainer import restore_model
  logging.set_verbosity(logging.WARNING)
  new = _NEW.value
  rng = np.random.default_rng(0)
  path = os.path.join(tempfile.mkdtemp(prefix='decode_bench_'), 'ckpt')
  arch, hf_model = random_checkpoint(path)
  cfg, ours = load_hf(path)  # fp32, scanned layers
  rows = []
  for batch in (1, 8):
    prompts = rng.integers(0, cfg.vocab_size, (batch, 16)).tolist()
    ours_s, ours_out = timed(lambda: generate(ours, prompts, new))
    ids = torch.tensor(prompts)

    def hf_generate():
      with torch.no_grad():
        return hf_model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    hf_s, hf_out = timed(hf_generate)
    same = sum(a == b[16:].tolist() for a, b in zip(ours_out.tokens, hf_out))
    rows.append(f'| {batch} | {batch * new / ours_s:,.0f} | {batch * new / hf_s:,.0f} | {hf_s / ours_s:.2f}x | '
                f'{same}/{batch} |')
  prompts8 = rng.integers(0, cfg.vocab_size, (8, 16)).tolist()
  cache_rows = []
  labels = {CacheForm.ABSORBED: 'absorbed latent', CacheForm.FP8: 'absorbed latent, FP8 (1x128 scales)',
            CacheForm.NAIVE: 'naive per-head K and V'}
  for form in (CacheForm.ABSORBED, CacheForm.NAIVE, CacheForm.FP8):
    size = bytes_per_token(jax.eval_shape(lambda: ours.init_cache(1, 1, form, 'bfloat16')))
    seconds, _ = timed(lambda: generate(ours, prompts8, new, cache=form))
    cache_rows.append(f'| {labels[form]} | {size:,} | {8 * new / seconds:,.0f} |')
  if not os.path.exists(os.path.join(_WORKDIR.value, 'model.json')):
    from deepseek_jax.trainer import train
    train(demo.get_config(), _WORKDIR.value)
  _, trained, step = restore_model(_WORKDIR.value, runtime(demo.get_config()))  # as it trained: layers unrolled
  from deepseek_jax.tokenizer import run_codec
  codec = run_codec(_WORKDIR.value)
  code_prompts = [codec.encode(text) for text in ('def ', 'import os\n', 'class Parser(object):\n    def ',
                                                  'for i in range(', '    return self.', '# Copyright',
                                                  'if __name__ == "__main__":\n    ', 'try:\n    import ')]
  spec_rows, findings, plain_step = [], [], {}
  for batch in (1, 8):
    prompts = code_prompts[:batch]
    plain_s, plain = timed(lambda: generate(trained, prompts, new))
    spec_s, spec = timed(lambda: generate(trained, prompts, new, speculative=True))
    tokens = sum(len(t) for t in plain.tokens)
    plain_step[batch] = plain_s / plain.steps
    step_ratio = spec_s / spec.steps / (plain_s / plain.steps)
    spec_rows.append(f'| {batch} | {tokens / plain_s:,.0f} | {tokens / spec_s:,.0f} | {plain_s / spec_s:.2f}x | '
                     f'{spec.accepted / spec.drafts:.1%} | {plain.steps} / {spec.steps} | {step_ratio:.2f}x | '
                     f'{"yes" if spec.tokens == plain.tokens else "NO"} |')
    findings.append(f'at batch {batch}, {spec.accepted / spec.drafts:.0%} of the drafts are kept and the '
                    f'decode steps fall {plain.steps / spec.steps:.2f}x, but a speculative step costs '
                    f'{step_ratio:.2f}x a plain one, so tokens/s changes {plain_s / spec_s:.2f}x')
  text = '\n'.join([
      f'Command: `python bench/decode.py --new_tokens={new} --repeats={_REPEATS.value}` ({os.cpu_count()} CPU '
      f'cores, jax {jax.__version__}, torch {torch.__version__}). Greedy, {new} new tokens per row after '
      '16-token prompts; tokens/s over the whole generate() call (prefill included), median of the timed runs '
      'after a warm-up.',
      '',
      'Ours against transformers `generate()` on one random model with the demo shapes '
      f'({cost.summary(arch)["total_params"] / 1e6:.1f}M parameters, {arch.n_routed_experts} experts '
      f'top-{arch.n_activated_experts}), both loading the same checkpoint; the last column counts rows whose '
      'tokens match:',
      '',
      '| batch | ours tokens/s | transformers tokens/s | speed-up | same tokens |',
      '|---|---|---|---|---|',
      *rows,
      '',
      'KV cache forms (ours, batch 8, same model; bytes per token over all layers in bf16):',
      '',
      '| cache | bytes / token | tokens/s |',
      '|---|---|---|',
      *cache_rows,
      '',
      f'MTP speculative decoding on the trained demo run (`{_WORKDIR.value}`, step {step}), code prompts:',
      '',
      '| batch | plain tokens/s | speculative tokens/s | speed-up | acceptance | decode steps plain / spec | '
      'time per step spec / plain | same tokens |',
      '|---|---|---|---|---|---|---|---|',
      *spec_rows,
      '',
      f'From these rows: {"; ".join(findings)}. A plain step with 8 rows takes '
      f'{plain_step[8] / plain_step[1]:.1f}x the time of one with 1 row. The paper reports 85-90% acceptance for '
      'V3 and 1.8x tokens/s.',
  ])
  print(text)
  replace_section('Decoding', text)


if __name__ == '__main__':
  app.run(main)
