r"""One prepared accelerator run (a single H200 or a TPU VM): kernels, training and decoding in one command.

  python bench/accelerator.py [--out=accelerator.json]     # on the accelerator, under 8 minutes
  python bench/accelerator.py --smoke --out=/tmp/a.json    # toy sizes on CPU (the test suite runs this)
  python bench/accelerator.py --merge=DIR --out=docs/accelerator/NAME.json   # here, after a run: see below

On a machine lent for minutes, run each section in its own process under its own limit, so one that hangs
costs only its share (a section's file holds what it measured before it was killed), then merge:
  for s in fp8_gemm:80 grouped_fp8_gemm:60 attention:70 train_step:170 decode:195; do n=${s%:*}
    echo "== $n (limit ${s#*:} s)" >>DIR/log; timeout ${s#*:} python bench/accelerator.py --sections=$n \
      --out=DIR/$n.json >>DIR/log 2>&1; echo "rc=$?" >>DIR/log; done
--merge joins DIR's section files (a section with no file gets the exit status its log recorded) into
--out and rewrites the "Accelerator run" section of docs/benchmarks.md from it.

Sections (each timed as the median of several runs of a compiled function; a section that fails is recorded
with its error and the run goes on, exiting 1 at the end):
- fp8_gemm: block-scaled FP8 GEMM (Pallas: Mosaic on TPU, Triton on GPU) against bf16 jnp.dot at V3's
  projection shapes: TFLOP/s and each one's relative error against the fp32 product, outlier rows included.
- grouped_fp8_gemm: the MoE grouped FP8 GEMM against bf16 ragged_dot at V3's expert shapes.
- attention: MLA causal attention at T = 4K (128 heads, q/k 128 + 64, v 128) forward and forward + backward
  in the backend's form (splash on TPU, flash elsewhere) against the dense form, TFLOP/s (causal FLOPs).
- train_step: a ~1B-parameter V3-shaped model's full train step (AdamW) in bf16 and with the FP8 recipe;
  MFU = cost.py's training FLOPs per token x tokens / step time / the chip's dense bf16 peak.
- decode: a random ~1B V3-shaped model: plain decode step time and tokens/s at batch 1 / 8 / 32, the
  speculative verification step (2 tokens a row) against it, and the step with int4 routed experts.
"""

import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SMOKE = flags.DEFINE_bool('smoke', False, 'Toy sizes, XLA kernels on CPU: checks the script end to end.')
_OUT = flags.DEFINE_string('out', 'accelerator.json', 'Where the JSON of every figure goes.')
_RUNS = flags.DEFINE_integer('runs', 5, 'Timed runs per figure (median) after one warm-up.')
_MERGE = flags.DEFINE_string('merge', None, "A folder of one run's section files and log: merge, write docs.")
_SECTIONS = flags.DEFINE_list('sections', ['fp8_gemm', 'grouped_fp8_gemm', 'attention', 'train_step', 'decode'],
                              'The sections to run, in this order.')

# Dense bf16 peak FLOP/s of one chip, by jax device_kind (vendor datasheets); MFU is left out elsewhere.
PEAK_BF16 = {'NVIDIA H200': 989e12, 'NVIDIA H100 80GB HBM3': 989e12, 'TPU v6 lite': 918e12, 'TPU v5 lite': 197e12,
             'TPU v5p': 459e12, 'TPU7x': 2307e12}


_REPORT = {}  # every figure so far; written after each one, so a run cut short keeps what it measured


def save():
  with open(_OUT.value, 'w') as f:
    json.dump(_REPORT, f, indent=1, default=float)


def seconds(f, *args):
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(_RUNS.value):
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def rel_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def outlier_rows(key, shape):
  k1, k2 = jax.random.split(key)
  return jax.random.normal(k1, shape) * jnp.exp(2.0 * jax.random.normal(k2, shape[:-1] + (1,)))


def fp8_gemm(smoke: bool, impl: str):
  from pallas_kernels import act_quant, block_gemm, common, weight_quant
  m = 256 if smoke else 4096
  shapes = [(256, 384)] if smoke else [(7168, 2176), (7168, 18432), (18432, 7168), (2048, 7168), (1536, 24576)]
  out = []
  for k, n in shapes:
    x = outlier_rows(jax.random.key(0), (m, k))
    w = jax.random.normal(jax.random.key(1), (k, n)) / np.sqrt(k)
    exact = jax.block_until_ready(jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST))
    progress(f'fp8_gemm {m}x{k}x{n}: fp32 reference ready')
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    bf16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    xq, xs = act_quant.act_quant(x, 'f32', impl)
    wq, ws = weight_quant.weight_quant(w, 'f32', impl)
    ws_cols = common.expand_block_scales(ws, n)
    fp8 = jax.jit(lambda a, sa, b, sb: block_gemm.gemm(a, sa, b, sb, jnp.float32, impl))
    flops = 2 * m * k * n
    jax.block_until_ready((xq, xs, wq, ws_cols))
    progress(f'fp8_gemm {m}x{k}x{n}: operands quantized')
    row = {'m': m, 'k': k, 'n': n, 'bf16_tflops': flops / seconds(bf16, xb, wb) / 1e12}
    progress(f'fp8_gemm {m}x{k}x{n}: bf16 timed')
    row['fp8_tflops'] = flops / seconds(fp8, xq, xs, wq, ws_cols) / 1e12
    progress(f'fp8_gemm {m}x{k}x{n}: fp8 timed')
    row.update(bf16_rel_error=rel_error(bf16(xb, wb), exact),
               fp8_rel_error=rel_error(fp8(xq, xs, wq, ws_cols), exact))
    out.append(row)
  return out


def grouped_fp8_gemm(smoke: bool, impl: str):
  from pallas_kernels import act_quant, fp8_linear, grouped_gemm
  from pallas_kernels.fp8_linear import Recipe
  u, e = (512, 4) if smoke else (8192, 32)
  shapes = [(256, 128)] if smoke else [(7168, 2048), (2048, 7168)]
  out = []
  for k, n in shapes:
    rows = outlier_rows(jax.random.key(2), (u, k))
    w = jax.random.normal(jax.random.key(3), (e, k, n)) / np.sqrt(k)
    tile_expert = jnp.repeat(jnp.arange(e, dtype=jnp.int32), u // 128 // e)  # equal groups of whole tiles
    sizes = jnp.full((e,), u // e, jnp.int32)
    exact = jax.lax.ragged_dot(rows, w, sizes, precision=jax.lax.Precision.HIGHEST)
    bf16 = jax.jit(lambda a, b: jax.lax.ragged_dot(a, b, sizes, preferred_element_type=jnp.float32))
    rq, rs = act_quant.act_quant(rows, 'f32', impl)
    wq, ws_cols, _ = fp8_linear.quantize_experts(w, Recipe('f32', impl), impl)
    fp8 = jax.jit(lambda a, sa, b, sb: grouped_gemm.grouped_gemm(a, sa, b, sb, tile_expert, jnp.float32, impl))
    flops = 2 * u * k * n
    rb, wb = rows.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    jax.block_until_ready((exact, rq, rs, wq, ws_cols))
    progress(f'grouped_fp8_gemm {u}x{k}x{n}: reference and operands ready')
    row = {'rows': u, 'experts': e, 'k': k, 'n': n, 'bf16_ragged_dot_tflops': flops / seconds(bf16, rb, wb) / 1e12}
    progress(f'grouped_fp8_gemm {u}x{k}x{n}: bf16 ragged_dot timed')
    row['fp8_grouped_tflops'] = flops / seconds(fp8, rq, rs, wq, ws_cols) / 1e12
    progress(f'grouped_fp8_gemm {u}x{k}x{n}: fp8 timed')
    row.update(bf16_rel_error=rel_error(bf16(rb, wb), exact),
               fp8_rel_error=rel_error(fp8(rq, rs, wq, ws_cols), exact))
    out.append(row)
  return out


def attention_section(smoke: bool):
  from deepseek_jax import attention
  b, t, h = (1, 256, 2) if smoke else (1, 4096, 128)
  n, r, v = 128, 64, 128
  keys = jax.random.split(jax.random.key(4), 5)
  shapes = ((b, t, h, n), (b, t, h, r), (b, t, h, n), (b, t, r), (b, t, h, v))
  args = [jax.random.normal(k, s, jnp.bfloat16) for k, s in zip(keys, shapes)]
  scale = (n + r) ** -0.5
  block = 128 if smoke else 512  # smoke: two blocks, so CPU's choice is flash too
  impl = attention.resolve('auto', t, block)
  fwd_flops = 2 * b * h * t * t / 2 * (n + r + v)  # causal: half the score matrix
  out = {'t': t, 'heads': h, 'impl': impl}
  for name in (impl, 'dense'):
    fwd = jax.jit(lambda *a, name=name: attention.causal(*a, scale, name, block))
    grad = jax.jit(jax.grad(
        lambda *a, name=name: jnp.sum(attention.causal(*a, scale, name, block).astype(jnp.float32)),
        argnums=tuple(range(5))))
    try:
      out[f'{name}_forward_tflops'] = fwd_flops / seconds(fwd, *args) / 1e12
      out[f'{name}_forward_backward_tflops'] = 3.5 * fwd_flops / seconds(grad, *args) / 1e12  # bwd ~ 2.5x fwd
    except Exception as error:  # the dense form at 4K x 128 heads may not fit: say so
      out[f'{name}_error'] = f'{type(error).__name__}: {str(error)[:300]}'
  ref = attention.dense(*[a.astype(jnp.float32) for a in args], scale) if smoke or h * t * t * 4 < 2**34 else None
  if ref is not None:
    out[f'{impl}_rel_error_vs_fp32_dense'] = rel_error(attention.causal(*args, scale, impl, block), ref)
  return out


def one_b_config(smoke: bool):
  """A V3-shaped model of about 1e9 parameters (~0.3e9 active): V3's MLA widths, 64 fine-grained experts."""
  from deepseek_jax.config import PRESETS
  if smoke:
    return PRESETS['tiny'].replace(n_layers=2)  # one dense block, one MoE block
  return PRESETS['tiny'].replace(
      vocab_size=32768, dim=1536, inter_dim=4096, moe_inter_dim=512, n_layers=8, n_dense_layers=1, n_heads=16,
      n_routed_experts=64, n_shared_experts=1, n_activated_experts=6, n_expert_groups=8, n_limited_groups=4,
      q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
      max_seq_len=4096, n_mtp_layers=1)


def train_section(smoke: bool, out: dict):
  from flax import nnx
  from deepseek_jax import cost
  from deepseek_jax.config import Runtime
  from deepseek_jax.model import DeepSeekV3
  from deepseek_jax.optimizer import adamw
  from deepseek_jax.train_step import Hyper, init_train_state, train_step
  cfg = one_b_config(smoke)
  batch, seq = (1, 32) if smoke else (8, 2048)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, batch, seq + 1)))
  hyper = Hyper(*(jnp.float32(x) for x in (1e-4, 1e-3, 0.3, 1e-4)))
  summary = cost.summary(cfg, seq)
  flops = (summary['train_flops_per_token'] + summary['mtp_train_flops_per_token']) * batch * seq
  peak = PEAK_BF16.get(jax.devices()[0].device_kind)
  out.update({'total_params': summary['total_params'], 'active_params': summary['active_params'],
              'tokens_per_step': batch * seq, 'model_flops_per_step': flops})
  for name, quant in (('bf16', 'none'), ('fp8', 'fp8')):
    rt = Runtime(dtype='bfloat16', quant=quant)
    tx = adamw()
    graphdef, state = init_train_state(DeepSeekV3(cfg, rt, nnx.Rngs(0)), tx)
    step = jax.jit(lambda s, tk: train_step(graphdef, tx, s, tk, hyper), donate_argnums=0)
    state, _ = step(state, tokens)  # compile and warm up
    jax.block_until_ready(state)
    times = []
    for _ in range(_RUNS.value):
      start = time.perf_counter()
      state, metrics = step(state, tokens)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - start)
    s = statistics.median(times)
    out[name] = {'step_seconds': s, 'tokens_per_second': batch * seq / s, 'loss': float(metrics['loss']),
                 'mfu': flops / s / peak if peak else None}
    save()
  return out


def decode_section(smoke: bool, out: dict):
  from flax import nnx
  from deepseek_jax import held
  from deepseek_jax.config import Runtime
  from deepseek_jax.model import DeepSeekV3
  cfg = one_b_config(smoke)
  prompt = 16 if smoke else 256
  rt = Runtime(dtype='bfloat16', param_dtype='bfloat16', scan_layers=False)
  model = DeepSeekV3(cfg, rt, nnx.Rngs(0))
  group = 128 if cfg.dim % 128 == 0 and cfg.moe_inter_dim % 128 == 0 else 32
  models = {'bf16': model, f'int4_experts_g{group}': held.experts_4bit(model, 'int4', group)}
  for name, m in models.items():
    decoder = m.unstacked()
    graphdef, weights = nnx.split(decoder)
    rows = out[name] = {}
    for batch in (1, 8) if smoke else (1, 8, 32):
      tokens = jnp.asarray(np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, prompt)))
      cache = jax.jit(lambda w, tk: nnx.merge(graphdef, w).forward(tk, cache=nnx.merge(graphdef, w).init_cache(
          tk.shape[0], prompt + 8)).cache)(weights, tokens)
      step = jax.jit(lambda w, c, tk, p: nnx.merge(graphdef, w).forward(tk, p, c).logits_BTW)
      position = lambda n: jnp.broadcast_to(prompt + jnp.arange(n, dtype=jnp.int32), (batch, n))
      one = seconds(step, weights, cache, tokens[:, :1], position(1))
      two = seconds(step, weights, cache, tokens[:, :2], position(2))
      rows[batch] = {'step_ms': one * 1e3, 'tokens_per_second': batch / one, 'verify_2_tokens_ms': two * 1e3,
                     'verify_over_plain': two / one,
                     # with acceptance a, a speculative step yields 1 + a tokens: it pays while 1 + a > this ratio
                     'break_even_acceptance': max(two / one - 1, 0.0)}
      save()
  return out


def progress(*parts):
  print(*parts, flush=True)  # a section killed at its limit shows how far it got


def merge(folder: str) -> dict:
  report, limits, status, name = {}, {}, {}, None
  for line in open(os.path.join(folder, 'log')):
    if line.startswith('== '):
      name = line.split()[1]
      limits[name] = line.split('limit ')[1].split()[0] if 'limit ' in line else None
    elif line.startswith('rc=') and name:
      status[name] = int(line[3:])
  for name in limits:
    path = os.path.join(folder, f'{name}.json')
    part = json.load(open(path)) if os.path.exists(path) else {}
    report.update({key: value for key, value in part.items()  # its own figures, and the run's facts once
                   if key in (name, f'{name}_seconds') or key not in report})
    if status.get(name) in (124, 137):
      report[name] = {**(report.get(name) or {}), 'error': f'killed at its {limits[name]} s limit'}
    elif name not in report:
      report[name] = {'error': f'no figures; exit status {status.get(name)}'}
  return report


def _f(x, digits=1):
  return f'{x:,.{digits}f}'


def docs_section(report: dict, path: str) -> str:
  lines = [f'`python bench/accelerator.py --merge=DIR --out={path}` on the section files of one run on '
           f"{report['device']} (backend {report['backend']}, jax {report['jax']}, kernels {report['kernels']}); "
           'each figure the median of 5 timed runs after a warm-up.', '']
  for name in ('fp8_gemm', 'grouped_fp8_gemm', 'attention', 'train_step', 'decode'):
    part = report.get(name)
    if isinstance(part, dict) and 'error' in part:
      lines.append(f'- {name}: **{part["error"]}**' + (' (figures below are those it finished)' if len(part) > 1
                                                          else ''))
  attention = report.get('attention', {})
  if 'flash_forward_tflops' in attention:
    impl = attention['impl']
    lines += ['', f"Attention, causal, T = {attention['t']}, {attention['heads']} heads, q/k 128 + 64, v 128, "
              f"bf16 (causal FLOPs; forward + backward counted as 3.5x forward); {impl}'s relative error against "
              f"fp32 dense: {attention[f'{impl}_rel_error_vs_fp32_dense']:.2e}.", '',
              '| form | forward TFLOP/s | forward + backward TFLOP/s |', '| --- | ---: | ---: |']
    for form in (impl, 'dense'):
      if f'{form}_forward_tflops' in attention:
        lines.append(f"| {form} | {_f(attention[f'{form}_forward_tflops'])} | "
                     f"{_f(attention[f'{form}_forward_backward_tflops'])} |")
  train = report.get('train_step', {})
  if 'bf16' in train:
    lines += ['', f"Train step (AdamW) of the V3-shaped model: {train['total_params'] / 1e9:.2f}e9 parameters, "
              f"{train['active_params'] / 1e9:.2f}e9 active, {train['tokens_per_step']:,} tokens a step, "
              f"{train['model_flops_per_step'] / 1e12:.1f} TFLOP a step by cost.py (MTP included); MFU against "
              f"the chip's dense bf16 peak. fp8: the paper's recipe with fp8_impl 'auto', which is the XLA form "
              f'off TPU (pallas_kernels.common.resolve_impl).', '',
              '| form | step s | tokens/s | MFU | loss at init |', '| --- | ---: | ---: | ---: | ---: |']
    for form in ('bf16', 'fp8'):
      if form in train:
        r = train[form]
        mfu = f"{100 * r['mfu']:.1f}%" if r['mfu'] else '-'
        lines.append(f"| {form} | {r['step_seconds']:.3f} | {_f(r['tokens_per_second'], 0)} | {mfu} | "
                     f"{r['loss']:.4f} |")
  decode = report.get('decode', {})
  if isinstance(decode, dict) and any(isinstance(v, dict) and v for v in decode.values()):
    from deepseek_jax import grouped_matmul
    cfg = one_b_config(report['smoke'])
    path = lambda tokens: grouped_matmul.resolve('auto', tokens, cfg.n_activated_experts, cfg.n_routed_experts,
                                                 report['backend'])
    lines += ['', 'Decode step of the same model (prompt 256; bf16 weights, and int4 routed experts): plain (1 '
              'token a row) and the speculative verification (2 tokens a row); a speculative step pays while 1 + '
              f"acceptance exceeds their ratio. MoE path: grouped_matmul's 'auto' for the step's tokens "
              f'({cfg.n_activated_experts} of {cfg.n_routed_experts} experts each).', '',
              '| weights | rows | step ms | tokens/s | verify ms | verify / plain | MoE path (plain / verify) |',
              '| --- | ---: | ---: | ---: | ---: | ---: | --- |']
    for weights, rows in decode.items():
      if not isinstance(rows, dict) or weights == 'error':
        continue
      for batch, r in rows.items():
        lines.append(f"| {weights} | {batch} | {r['step_ms']:.2f} | {_f(r['tokens_per_second'], 0)} | "
                     f"{r['verify_2_tokens_ms']:.2f} | {r['verify_over_plain']:.2f} | "
                     f'{path(int(batch))} / {path(2 * int(batch))} |')
  for name in ('fp8_gemm', 'grouped_fp8_gemm'):
    rows = report.get(name)
    if isinstance(rows, list):
      lines += ['', f'{name}:', '', '| shape | bf16 TFLOP/s | fp8 TFLOP/s | bf16 error | fp8 error |',
                '| --- | ---: | ---: | ---: | ---: |']
      for r in rows:
        bf16, fp8 = [k for k in r if k.endswith('_tflops')]
        shape = ' x '.join(str(r[k]) for k in r if k in ('m', 'rows', 'experts', 'k', 'n'))
        lines.append(f"| {shape} | {_f(r[bf16])} | {_f(r[fp8])} | {r['bf16_rel_error']:.2e} | "
                     f"{r['fp8_rel_error']:.2e} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  if _MERGE.value:
    report = merge(_MERGE.value)
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, 'w') as f:
      json.dump(report, f, indent=1, default=float)
    from bench import report as docs
    text = docs_section(report, os.path.relpath(_OUT.value))
    docs.replace_section('Accelerator run', text)
    print(text)
    return
  smoke = _SMOKE.value
  if smoke:
    jax.config.update('jax_platforms', 'cpu')
  backend = jax.default_backend()
  impl = 'pallas' if backend in ('tpu', 'gpu') else 'xla'
  report = _REPORT
  report.update({'device': jax.devices()[0].device_kind, 'backend': backend, 'smoke': smoke, 'kernels': impl,
                 'jax': jax.__version__})
  sections = {'fp8_gemm': lambda: fp8_gemm(smoke, impl), 'grouped_fp8_gemm': lambda: grouped_fp8_gemm(smoke, impl),
              'attention': lambda: attention_section(smoke),
              'train_step': lambda: train_section(smoke, report.setdefault('train_step', {})),
              'decode': lambda: decode_section(smoke, report.setdefault('decode', {}))}
  unknown = set(_SECTIONS.value) - set(sections)
  if unknown:
    raise app.UsageError(f'--sections: unknown {sorted(unknown)}; choose from {list(sections)}')
  failed = []
  for name in _SECTIONS.value:
    run = sections[name]
    start = time.perf_counter()
    try:
      report[name] = run()
    except Exception as error:
      failed.append(name)
      report[name] = {**report.get(name, {}), 'error': f'{type(error).__name__}: {error}',  # keeps partial figures
                      'traceback': traceback.format_exc()[-3000:]}
    report[name + '_seconds'] = time.perf_counter() - start
    print(f'{name} ({report[name + "_seconds"]:.0f} s):', json.dumps(report[name], indent=1, default=float),
          flush=True)
    save()
  print(f'wrote {_OUT.value}' + (f'; FAILED: {", ".join(failed)}' if failed else ''))
  if failed:
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
