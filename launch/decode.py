r"""Generate text from a training run or an official-format Hugging Face directory (absl).

  python -m launch.decode --workdir=runs/demo --prompt="def " --temperature=0 --speculative=mtp
  python -m launch.decode --hf_dir=/models/DeepSeek-V3 --fp8_weights --mesh.expert=8 \
      --prompt_file=prompts.txt --max_new_tokens=256      # 8 GPUs of one host: experts over 8, rows over 8
  python -m launch.decode --workdir=runs/demo --prompt="def " --weights4=int4   # 4-bit routed experts

Streams the text of a single prompt as it is generated, then prints tokens/s (and the MTP acceptance rate).
On a mesh (--mesh.data x --mesh.expert devices; on a CPU-only machine --cpu_devices splits the host) each
device loads only its shards of the weights (the training sharding rules: routed experts over 'expert', every
other weight FSDP-split over both axes), holds the latent cache of its rows, and the MoE layers dispatch
over 'expert'. A multi-host slice runs one process per host (--coordinator_address ..., or detected on TPU
pods and SLURM); process 0 prints.
"""

import os
import sys
import time

from absl import app, flags, logging

from deepseek_jax import expert_parallel, held, run_dir, sharding
from deepseek_jax.cache import CacheForm
from deepseek_jax.config import Runtime
from deepseek_jax.generate import generate, max_new_limit
from deepseek_jax.hf import load_hf, read_config
from deepseek_jax.sampling import SamplingParams, check_params
from deepseek_jax.tokenizer import hf_codec, run_codec
from deepseek_jax.trainer import restore_model
from launch import processes

_WORKDIR = flags.DEFINE_string('workdir', None, 'A run directory written by launch/train.py (newest checkpoint).')
_HF_DIR = flags.DEFINE_string('hf_dir', None, 'An official-format Hugging Face DeepSeek directory.')
_PROMPT = flags.DEFINE_string('prompt', None, 'The prompt.')
_PROMPT_FILE = flags.DEFINE_string('prompt_file', None, 'A file with one prompt per line (one batch).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 128, 'Tokens to generate per prompt at most.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample from the k most likely tokens (0: all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Sample from the smallest set of tokens with this probability.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_SPECULATIVE = flags.DEFINE_enum('speculative', 'none', ['none', 'mtp'], 'Draft with the MTP module.')
_CACHE = flags.DEFINE_enum('cache', CacheForm.ABSORBED.value, [form.value for form in CacheForm],
                           'KV cache: the absorbed MLA latent, the latent in FP8, or per-head K/V (naive).')
_DTYPE = flags.DEFINE_enum('dtype', None, ['bfloat16', 'float32'],
                           'Weights and activations (default: float32 for --workdir, bfloat16 for --hf_dir).')
_FP8_WEIGHTS = flags.DEFINE_bool('fp8_weights', False, 'Keep an FP8 checkpoint in FP8 (--hf_dir).')
_WEIGHTS4 = flags.DEFINE_enum('weights4', 'none', ['none', 'int4', 'mxfp4'],
                              'Hold the routed experts as packed 4-bit codes + group scales (quantized on load).')
_WEIGHTS4_GROUP = flags.DEFINE_integer('weights4_group', 0, 'Input rows per 4-bit scale: int4 32 / 64 / 128, '
                                       'mxfp4 32 (0: int4 128, mxfp4 32).')
_MESH_DATA = flags.DEFINE_integer('mesh.data', 1, 'Devices the batch rows (and FSDP weight shards) split over.')
_MESH_EXPERT = flags.DEFINE_integer('mesh.expert', 1, 'Devices the routed experts split over (the rows split over '
                                    'data x expert).')
_ALLOW_REPLICATED = flags.DEFINE_bool('allow_replicated', False, 'Warn instead of failing when a large weight '
                                      'has no dimension the mesh divides (every device then holds all of it).')
_SCAN_LAYERS = flags.DEFINE_bool('scan_layers', True, 'Scan the stacked layers; --noscan_layers decodes with '
                                 'per-layer weights (faster for small models on CPU, compile time ~ depth).')


def main(argv):
  del argv
  try:
    _decode()
  except (ValueError, FileNotFoundError) as error:
    logging.debug('the traceback (shown with --verbosity=1):', exc_info=True)
    sys.exit(f'error: {error}')  # exit status 1; the message names the flag, file or tensor at fault


def _decode():
  processes.start((1, _MESH_DATA.value, _MESH_EXPERT.value))
  import jax
  if jax.process_index() != 0:  # every process runs the same steps; one prints
    sys.stdout = open(os.devnull, 'w')
  if bool(_WORKDIR.value) == bool(_HF_DIR.value):
    raise app.UsageError('give exactly one of --workdir and --hf_dir')
  if bool(_PROMPT.value is not None) == bool(_PROMPT_FILE.value):
    raise app.UsageError('give exactly one of --prompt and --prompt_file')
  dtype = _DTYPE.value or ('float32' if _WORKDIR.value else 'bfloat16')
  rt = Runtime(param_dtype=dtype, dtype=dtype, fp8_weights=_FP8_WEIGHTS.value, weights4=_WEIGHTS4.value,
               weights4_group=_WEIGHTS4_GROUP.value, scan_layers=_SCAN_LAYERS.value)
  # The tokenizer and the prompts first: a missing or mismatched tokenizer must not cost a weight load.
  if _WORKDIR.value:
    if _FP8_WEIGHTS.value:
      raise app.UsageError('--fp8_weights holds an official FP8 checkpoint as FP8: use it with --hf_dir')
    codec, cfg = run_codec(_WORKDIR.value), run_dir.model_config(_WORKDIR.value)
  else:
    codec, (cfg, _) = hf_codec(_HF_DIR.value), read_config(_HF_DIR.value)
  mesh, replicated = None, _ALLOW_REPLICATED.value
  if _MESH_DATA.value * _MESH_EXPERT.value > 1:
    mesh = sharding.make_mesh(data=_MESH_DATA.value, expert=_MESH_EXPERT.value)
    expert_parallel.check_divides(cfg.n_routed_experts, mesh)  # before the weights are read
  params = SamplingParams(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  check_params(params, cfg.vocab_size)
  if codec.tokenizer.get_vocab_size() > cfg.vocab_size:
    raise ValueError(f'the tokenizer has {codec.tokenizer.get_vocab_size()} tokens but the model vocab_size is '
                     f'{cfg.vocab_size}: ids past the vocabulary have no embedding')
  if _PROMPT_FILE.value:
    with open(_PROMPT_FILE.value) as f:
      texts = [line.rstrip('\n') for line in f if line.strip()]
  else:
    texts = [_PROMPT.value]
  prompts = [codec.encode(text) for text in texts]
  if any(not p for p in prompts):
    raise app.UsageError('a prompt encodes to no tokens: give some text')
  speculative = _SPECULATIVE.value == 'mtp'
  max_new, room = _MAX_NEW.value, max_new_limit(cfg, max(map(len, prompts)), speculative)
  if max_new > room and not flags.FLAGS['max_new_tokens'].present:  # the default, on a short-context model
    max_new = room
    print(f'--max_new_tokens defaults to {_MAX_NEW.value}; this model (max_seq_len {cfg.max_seq_len}) has room '
          f'for {room} after the prompt: generating {room}', file=sys.stderr)
  if _WORKDIR.value:
    _, model, step = restore_model(_WORKDIR.value, rt.replace(weights4='none'), mesh, replicated)
    print(f'restored step {step} of {_WORKDIR.value}', file=sys.stderr)
    if rt.weights4 != 'none':
      model = held.experts_4bit(model, rt.weights4, rt.weights4_group)
  else:
    _, model = load_hf(_HF_DIR.value, rt, mesh, replicated)
  streamed, marks = [], []  # marks: (time, tokens so far) after each step

  def on_step(new_tokens):
    marks.append((time.perf_counter(), sum(map(len, new_tokens)) + (marks[-1][1] if marks else 0)))
    if len(prompts) == 1:
      streamed.extend(new_tokens[0])
      text = codec.decode(streamed)
      sys.stdout.write(text[len(on_step.shown):])
      sys.stdout.flush()
      on_step.shown = text

  on_step.shown = ''
  if len(prompts) == 1:
    sys.stdout.write(texts[0])
  start = time.perf_counter()
  result = generate(model, prompts, max_new, params, seed=_SEED.value, stop_tokens=codec.stop_ids,
                    speculative=speculative, cache=CacheForm(_CACHE.value), on_step=on_step, mesh=mesh,
                    allow_replicated=replicated)
  if len(prompts) > 1:
    for text, tokens in zip(texts, result.tokens):
      print(f'{text}{codec.decode(tokens)}\n---')
  # Throughput after the first decode step: the prefill and both compilations are behind us by then.
  (t1, n1), (t2, n2) = marks[min(1, len(marks) - 1)], marks[-1]
  rate = f'{(n2 - n1) / (t2 - t1):.1f} tokens/s' if t2 > t1 else 'n/a'
  print(f'\n{n2} tokens in {result.steps} decode steps; first token after {marks[0][0] - start:.2f}s '
        f'(prefill and compilation), then {rate}')
  if speculative:
    print(f'MTP acceptance: {result.accepted}/{result.drafts} = {result.accepted / max(result.drafts, 1):.1%}')


if __name__ == '__main__':
  app.run(main)
