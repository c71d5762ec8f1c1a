r"""Decoding throughput: ours against transformers' generate(), the weight bytes a step reads against the
minimum, step time against rows for each expert dispatch, KV cache forms, 4-bit / FP8-held experts, and MTP
speculative against plain decoding on the trained demo model.

  python bench/decode.py [--workdir=runs/demo --new_tokens=64 --repeats=3]

One random model with the demo's shapes, loaded by both frameworks from the same checkpoint (ours with its
layers unrolled, the faster decode on CPU), greedy, equal-length prompts; the rows, dispatch and speculative
tables decode the trained demo run (trained first when --workdir does not hold one). Tokens/s = new tokens of
all rows / wall time of generate() including the prefill; a step's time = (time of a max_new_tokens call -
time of a 2-token call) / the steps between them. Each figure is the median of --repeats runs after a warm-up
run (compilation excluded), each run after 0.5 s idle; ours and transformers are timed in turn, a run of each
per round. Writes the "Decoding" section of docs/benchmarks.md.

Weight bytes per step: what a plain decode step reads of the weights (the embedding's rows and the MTP block
are not read), counted by construction from the expert dispatch that `grouped_matmul.resolve` picks, against
the minimum (the dense weights + each MoE layer's distinct experts of that step, from the routing of a
teacher-forced forward over the generated tokens). The floor is that minimum at the rates this machine
streams fp32 weights, measured in the same run: the dense weights through XLA matmuls with the same rows
(x @ [256, 4096] matrices holding as many bytes), the routed experts through the native CPU kernel
(cpu_kernels.py) with one row per expert.
"""

import collections
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.prompts import CODE_PROMPTS  # noqa: E402
from bench.report import replace_section  # noqa: E402
from bench.step_reads import routing, weight_bytes  # noqa: E402
from bench.timing import compiled_seconds  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'A trained demo run (trained here if missing).')
_NEW = flags.DEFINE_integer('new_tokens', 64, 'Tokens generated per row.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs (median reported) after one warm-up run.')

ROWS = (1, 2, 4, 8, 16, 32)


def timed(*fns):
  """(median seconds, last result) of each fn over --repeats runs after a warm-up run each, the fns timed in
  turn (one run of each per round) so that a drift in the machine's speed falls on all of them alike, each
  run after 0.5 s idle: PyTorch's threads spin for a while after its ops (bench/timing.py)."""
  results = [fn() for fn in fns]  # warm-up: compilation / allocator
  times = [[] for _ in fns]
  for _ in range(_REPEATS.value):
    for i, fn in enumerate(fns):
      time.sleep(0.5)
      start = time.perf_counter()
      results[i] = fn()
      times[i].append(time.perf_counter() - start)
  out = [(statistics.median(t), r) for t, r in zip(times, results)]
  return out[0] if len(fns) == 1 else out


def step_seconds(model, prompts, **kw):
  """Seconds per decode step, the prefill and the call's fixed costs taken out; and the long call's result."""
  from deepseek_jax.generate import generate
  long_s, long = timed(lambda: generate(model, prompts, _NEW.value, **kw))
  short_s, short = timed(lambda: generate(model, prompts, 2, **kw))
  return (long_s - short_s) / (long.steps - short.steps), long


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


def distinct_experts(model, tokens_BT, first):
  """Per MoE layer, the mean over decode steps of the distinct routed experts all rows select, from the
  routing of a teacher-forced forward (step_reads.routing), where the steps' positions are `first` onwards."""
  return [np.mean([len(np.unique(e_BTK[:, j])) for j in range(first, e_BTK.shape[1])])
          for e_BTK in routing(model, tokens_BT)]


def _streamed_seconds(total_bytes, w_shape, x, product):
  """Seconds this machine takes to stream `total_bytes` of fp32 weights of shape w_shape through
  product(x, w), one weight after another, median of 9 after a warm-up."""
  import jax
  import jax.numpy as jnp
  per = int(np.prod(w_shape)) * 4
  ws = [jnp.asarray(np.random.default_rng(i).standard_normal(w_shape, np.float32))
        for i in range(max(1, round(total_bytes / per)))]
  seconds = compiled_seconds(jax.jit(lambda x, ws: [product(x, w) for w in ws]), jnp.asarray(x), ws)
  return seconds * total_bytes / (len(ws) * per)


def stream_seconds(total_bytes, rows):
  """`total_bytes` of fp32 weights through x[rows, 256] @ w matmuls (the decode step's access pattern at its
  smallest)."""
  return _streamed_seconds(total_bytes, (256, 4096), np.ones((rows, 256), np.float32), lambda x, w: x @ w)


def native_stream_seconds(total_bytes, n_experts, dim, inter, top_k):
  """`total_bytes` of fp32 expert stacks [E, dim, inter] through the native CPU kernel (cpu_kernels.py) with
  one row for every expert (E / top_k tokens, each routed to top_k experts no other token chose)."""
  import jax
  import jax.numpy as jnp
  from deepseek_jax import cpu_kernels
  per = 3 * n_experts * dim * inter * 4  # w1, w2, w3 of every expert
  rng = np.random.default_rng(0)
  stacks = [[jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in
             ((n_experts, dim, inter), (n_experts, inter, dim), (n_experts, dim, inter))]
            for _ in range(max(1, round(total_bytes / per)))]
  x = n_experts // top_k
  x_XD = jnp.asarray(rng.standard_normal((x, dim), np.float32))
  experts_XK = jnp.arange(x * top_k, dtype=jnp.int32).reshape(x, top_k)
  run = jax.jit(lambda x_XD, stacks: [cpu_kernels.routed_swiglu(x_XD, experts_XK, jnp.ones((x, top_k)), *ws, None)
                                      for ws in stacks])
  return compiled_seconds(run, x_XD, stacks) * total_bytes / (len(stacks) * per)


def projection_seconds(model, rows):
  """(native, XLA) seconds for every projection a plain step runs (the Linear weights outside the embedding and
  the MTP block), each x[rows, in] @ w, one compiled call each way (cpu_kernels.matmul against jnp.dot)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from deepseek_jax import cpu_kernels
  from deepseek_jax.layers import Linear
  ws = [m.kernel[...] for path, m in nnx.iter_graph(model)
        if isinstance(m, Linear) and path[0] not in ('embed', 'mtp')]
  xs = [jnp.asarray(np.random.default_rng(i).standard_normal((rows, w.shape[0]), np.float32)) for i, w in enumerate(ws)]
  native = jax.jit(lambda xs, ws: [cpu_kernels.matmul(x, w, None) for x, w in zip(xs, ws)])
  xla = jax.jit(lambda xs, ws: [jnp.dot(x, w) for x, w in zip(xs, ws)])
  return compiled_seconds(native, xs, ws), compiled_seconds(xla, xs, ws), sum(w.nbytes for w in ws)


def read_experts(cfg, rt, rows, distinct):
  """(dispatch, routed experts a plain step reads over all MoE layers) by construction (grouped_matmul.py,
  cpu_kernels.py): gather reads one expert per routed copy, dense every expert when the copies cover them or
  else each distinct one once, native and host each expert with rows once, ragged / tiled the whole stack."""
  from deepseek_jax import grouped_matmul as gm
  copies, e, layers = rows * cfg.n_activated_experts, cfg.n_routed_experts, len(distinct)
  impl = gm.resolve(rt.gmm_impl, rows, cfg.n_activated_experts, e)
  if impl == 'gather':
    return impl, copies * layers
  if (impl == 'dense' and copies < e) or impl in ('native', 'host'):
    return impl, sum(distinct)
  return impl, e * layers


def main(argv):
  del argv
  import jax
  import torch
  from configs import demo
  from deepseek_jax import cost, cpu_kernels
  from deepseek_jax.cache import CacheForm, bytes_per_token
  from deepseek_jax.config import Runtime
  from deepseek_jax.generate import generate
  from deepseek_jax.hf import load_hf
  from deepseek_jax.run_config import runtime
  from deepseek_jax.tokenizer import run_codec
  from deepseek_jax.trainer import restore_model
  logging.set_verbosity(logging.WARNING)
  new = _NEW.value
  rng = np.random.default_rng(0)
  path = os.path.join(tempfile.mkdtemp(prefix='decode_bench_'), 'ckpt')
  arch, hf_model = random_checkpoint(path)
  rt = Runtime(scan_layers=False)
  cfg, ours = load_hf(path, rt)  # fp32
  dense_bytes, _, expert_bytes = weight_bytes(ours)  # a plain step reads no MTP weight
  n_moe = cfg.n_layers - cfg.n_dense_layers
  peer_rows, bytes_rows = [], []
  for batch in (1, 8, 32):
    prompts = rng.integers(0, cfg.vocab_size, (batch, 16)).tolist()
    ids = torch.tensor(prompts)

    def hf_generate():
      with torch.no_grad():
        return hf_model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    (ours_s, ours_out), (hf_s, hf_out) = timed(lambda: generate(ours, prompts, new), hf_generate)
    same = sum(a == b[16:].tolist() for a, b in zip(ours_out.tokens, hf_out))
    peer_rows.append(f'| {batch} | {batch * new / ours_s:,.0f} | {batch * new / hf_s:,.0f} | '
                     f'{hf_s / ours_s:.2f}x | {same}/{batch} |')
    tokens_BT = np.asarray([p + t[:-1] for p, t in zip(prompts, ours_out.tokens)], np.int32)
    distinct = distinct_experts(ours, tokens_BT, 16)
    minimum = dense_bytes + expert_bytes * sum(distinct)
    impl, experts_read = read_experts(cfg, rt, batch, distinct)
    read = dense_bytes + expert_bytes * experts_read
    experts_min = minimum - dense_bytes
    # The floor: the dense weights at the rate XLA's matmuls stream them with this batch's rows, the routed
    # experts' minimum at the native kernel's rate with one row per expert (its least work per byte).
    floor_s = (stream_seconds(dense_bytes, batch) +
               native_stream_seconds(experts_min, cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim,
                                     cfg.n_activated_experts))
    ceiling = hf_s / (new * floor_s)  # the speed-up if every step took only the floor (prefill free)
    bytes_rows.append(f'| {batch} | {impl} | {read / 1e6:.2f} MB | {minimum / 1e6:.2f} MB | '
                      f'{read / minimum:.2f}x | {np.mean(distinct):.1f} of {cfg.n_routed_experts} | '
                      f'{floor_s * 1e3:.2f} ms | {ours_s / new * 1e3:.2f} ms | '
                      f'{hf_s / new * 1e3:.2f} ms | {ceiling:.1f}x |')
  projection_rows = []
  for rows in (1, 2, 4, 8, 16, 32, 64):
    native_s, xla_s, nbytes = projection_seconds(ours.unstacked(), rows)
    projection_rows.append(f'| {rows} | {native_s * 1e3:.3f} | {xla_s * 1e3:.3f} | {xla_s / native_s:.2f}x | '
                           f'{nbytes / native_s / 1e9:.1f} | {nbytes / xla_s / 1e9:.1f} |')
  # Held formats of the routed experts: fp32, FP8 (every projection, 128x128 scales), int4 / MXFP4.
  held_rows = []
  for label, held_rt in (('fp32', rt), ('FP8 (all projections)', dataclasses.replace(rt, fp8_weights=True)),
                         ('int4, group 128', dataclasses.replace(rt, weights4='int4')),
                         ('MXFP4', dataclasses.replace(rt, weights4='mxfp4'))):
    _, held = load_hf(path, held_rt)
    d_bytes, _, e_bytes = weight_bytes(held)
    speeds = []
    for batch in (1, 8):
      prompts = rng.integers(0, cfg.vocab_size, (batch, 16)).tolist()
      seconds, _ = timed(lambda: generate(held, prompts, new))
      speeds.append(f'{batch * new / seconds:,.0f}')
    held_rows.append(f'| {label} | {e_bytes * cfg.n_routed_experts * n_moe / 1e6:.2f} MB | '
                     f'{(d_bytes + e_bytes * cfg.n_routed_experts * n_moe) / 1e6:.2f} MB | {" | ".join(speeds)} |')
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
  trained_rt = runtime(demo.get_config())  # as it trained: layers unrolled
  codec = run_codec(_WORKDIR.value)
  code_prompts = [codec.encode(text) for text in CODE_PROMPTS]
  step_rows = collections.defaultdict(list)
  for impl in ('gather', 'dense', 'host', 'native', 'auto'):
    _, trained, step = restore_model(_WORKDIR.value, dataclasses.replace(trained_rt, gmm_impl=impl))
    for rows in ROWS:
      prompts = (code_prompts * (rows // len(code_prompts) + 1))[:rows]
      step_rows[rows].append(f'{step_seconds(trained, prompts)[0] * 1e3:.2f}')
      if impl == 'auto':
        spec_s, spec = step_seconds(trained, prompts, speculative=True)
        step_rows[rows].append(f'{spec_s * 1e3:.2f} ({spec.accepted / spec.drafts:.0%})')
  rows_table = [f'| {rows} | {" | ".join(cells)} |' for rows, cells in step_rows.items()]
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
      f'top-{arch.n_activated_experts}), both loading the same checkpoint, fp32; the last column counts rows '
      'whose tokens match:',
      '',
      '| batch | ours tokens/s | transformers tokens/s | speed-up | same tokens |',
      '|---|---|---|---|---|',
      *peer_rows,
      '',
      'Weight bytes a plain step reads (same runs): ours by construction of the dispatch it picks, the minimum '
      'from the distinct experts the step routes to. The floor is that minimum at the rates measured here in '
      'the same run: the dense weights streamed through XLA matmuls with the batch\'s rows (`stream_seconds`), '
      'the routed experts through the native kernel with one row per expert (`native_stream_seconds`); ms / '
      'step divides the whole call by the new tokens (prefill included); the ceiling is the speed-up over '
      'transformers if each of our steps took only the floor and the prefill nothing:',
      '',
      '| batch | dispatch | ours reads | minimum | ours / minimum | distinct experts per layer | '
      'floor / step | ours ms / step | transformers ms / step | ceiling |',
      '|---|---|---|---|---|---|---|---|---|---|',
      *bytes_rows,
      '',
      'The projections of a plain step (every Linear weight outside the embedding and the MTP block), each '
      'x[rows, in] @ w in one compiled call, through the native kernel (`cpu_kernels.matmul`, what `Linear` runs '
      f'up to {cpu_kernels.LINEAR_ROWS} rows) and through XLA (`projection_seconds`), ms:',
      '',
      '| rows | native ms | XLA ms | XLA / native | native GB/s | XLA GB/s |',
      '|---|---|---|---|---|---|',
      *projection_rows,
      '',
      'Routed experts held in each format (same random model, loaded by `load_hf` with the Runtime that says '
      'so; the weights of a step are all experts of every MoE layer plus the dense weights), tokens/s at batch 1 '
      'and 8. On CPU the native kernels read float weights only: FP8 and 4-bit experts run through XLA\'s '
      'gather / dense layouts, dequantized after the read (FP8-held projections through XLA too):',
      '',
      '| routed experts | expert bytes | weight bytes (dense + all experts) | tokens/s b1 | tokens/s b8 |',
      '|---|---|---|---|---|',
      *held_rows,
      '',
      'KV cache forms (ours, batch 8, same model; bytes per token over all layers in bf16):',
      '',
      '| cache | bytes / token | tokens/s |',
      '|---|---|---|',
      *cache_rows,
      '',
      f'Decode step time (ms) against rows on the trained demo run (`{_WORKDIR.value}`, step {step}), code '
      'prompts, for each expert dispatch (`Runtime.gmm_impl`), and MTP speculative with the automatic choice '
      '(acceptance in brackets):',
      '',
      '| rows | gather | dense | host | native | auto | speculative (auto) |',
      '|---|---|---|---|---|---|---|',
      *rows_table,
      '',
      'MTP speculative decoding on the same run, code prompts:',
      '',
      '| batch | plain tokens/s | speculative tokens/s | speed-up | acceptance | decode steps plain / spec | '
      'time per step spec / plain | same tokens |',
      '|---|---|---|---|---|---|---|---|',
      *spec_rows,
      '',
      f'From these rows: {"; ".join(findings)}. A plain step with 8 rows takes '
      f'{plain_step[8] / plain_step[1]:.1f}x the time of one with 1 row (the parts of a speculative step: '
      '"Speculative decoding, part by part"). The paper reports '
      '85-90% acceptance for V3 and 1.8x tokens/s.',
  ])
  print(text)
  replace_section('Decoding', text)


if __name__ == '__main__':
  app.run(main)
