"""Batched generation: prefill, then a jit-compiled decode loop with fixed shapes, plain or MTP-speculative.

Prompts of different lengths are right-padded into one batch; each row decodes at its own position. The
loop runs in compiled chunks of steps (`lax.while_loop`, one compilation for a given batch, prompt length and
budget; it ends early once every row is done): the whole budget at once, or one step at a time when a
callback streams the tokens out.

Prefill and every step run the model's own trunk (`DeepSeekV3.forward` and `mtp_forward`) with a cache of the
chosen form (cache.py). Speculative decoding with the MTP module (paper §2.2, §5.4.3): the MTP module drafts
the token after next; one main-model forward over [next token, draft] verifies the draft and yields the token
after it, so a step emits two tokens when the draft is kept and one otherwise. A rejected draft's cache entry
is simply overwritten by the next step (the cache rolls back by not advancing). Acceptance follows the
lossless rule of sampling.accept_draft, so greedy output is token for token the plain greedy output.

On a mesh (`mesh=`, sharding.make_mesh) decoding is data-parallel over the rows and expert-parallel over
the routed experts, as DeepSeek serves V3 (paper §3.4: data-parallel attention, expert-parallel MoE): the weights
take the training shardings (sharding.RULES: routed experts over 'expert', FSDP over the rest), the cache is
split by rows over data x expert (MLA's one latent per position is never copied per head or per device), and
the MoE layers dispatch over 'expert' with expert_parallel.py. The batch is padded with finished rows to a
multiple of the data x expert devices, so every dispatch sees whole per-device token blocks; padded rows come
last, and JAX's counter-based random numbers give the real rows the same draws as without padding.

Letters beyond model.py's key: J the emitted-token slots of a row (max_new_tokens + 1).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax import cache as kv
from deepseek_jax import sharding
from deepseek_jax.cache import Cache, CacheForm
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.sampling import SamplingParams, accept_draft, check_params, sample


class Generation(NamedTuple):
  tokens: list[list[int]]  # per row, the new tokens (a stop token included, then nothing)
  steps: int  # decode steps after the prefill
  drafts: int  # speculative: drafts verified (summed over rows still generating)
  accepted: int  # speculative: drafts kept


class _State(NamedTuple):
  cache: Cache
  token_B: jax.Array  # the newest token, not yet run through the main model
  position_B: jax.Array  # its position
  key: jax.Array
  out_BJ: jax.Array  # emitted tokens
  count_B: jax.Array  # tokens emitted per row
  done_B: jax.Array
  draft_B: jax.Array  # speculative: the MTP draft for position + 1
  draft_logits_BW: jax.Array  # speculative: the logits it was drawn from
  drafts: jax.Array
  accepted: jax.Array


def generate(model: DeepSeekV3, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             params: SamplingParams = SamplingParams(), seed: int = 0, stop_tokens: Sequence[int] = (),
             speculative: bool = False, cache: CacheForm = CacheForm.ABSORBED, cache_dtype=None,
             on_step: Callable[[list[list[int]]], None] | None = None, mesh=None,
             allow_replicated: bool = False) -> Generation:
  """Generates up to max_new_tokens after each prompt. `on_step(new_tokens_per_row)` streams each step.

  cache: the KV cache form; cache_dtype: its dtype (default: the model's compute dtype). A model whose
  Runtime unrolls its layers (scan_layers=False) decodes with per-layer weights (DeepSeekV3.unstacked), copied
  on its first call and reused while its weight arrays stay the same.
  mesh: decode on this ('pipeline', 'data', 'expert') mesh (pipeline 1); weights not yet in their sharding
  (load_hf and restore_model place them there) are moved into it, raising ReplicatedError for a large
  weight the mesh cannot split unless allow_replicated."""
  cfg = model.cfg
  prompts = [list(p) for p in prompts]
  _check(cfg, prompts, max_new_tokens, params, speculative)
  b, t = len(prompts), max(len(p) for p in prompts)
  rows = b
  if mesh is not None:
    if mesh.shape['pipeline'] > 1:
      raise ValueError(f'generate: decoding runs on data x expert meshes; mesh.pipeline={mesh.shape["pipeline"]} '
                       'must be 1')
    rows = -(-b // sharding.batch_devices(mesh)) * sharding.batch_devices(mesh)
    model = _placed(model, mesh, allow_replicated)
  # Rows past b pad the batch to whole device blocks: one-token prompts that are done from the start.
  lengths_B = np.asarray([len(p) for p in prompts] + [1] * (rows - b), np.int32)
  tokens_BT = np.asarray([p + [0] * (t - len(p)) for p in prompts] + [[0] * t] * (rows - b), np.int32)
  live_B = np.arange(rows) < b
  stops = tuple(int(s) for s in stop_tokens)
  decoder, graphdef, weights, caches = _decoder(model)
  make_cache = lambda: decoder.init_cache(rows, t + max_new_tokens + 2, cache, cache_dtype)
  if mesh is None:
    kv_cache = _empty_cache(graphdef, weights, caches, rows, t + max_new_tokens + 2, cache, cache_dtype)
    inputs = tuple(map(jnp.asarray, (tokens_BT, lengths_B, live_B)))
  else:  # each device builds only its rows of the cache
    kv_cache = jax.jit(make_cache, out_shardings=kv.shardings(jax.eval_shape(make_cache), mesh))()
    inputs = tuple(_on_rows(a, mesh) for a in (tokens_BT, lengths_B, live_B))
  # Traced under the mesh: the MoE layers see its 'expert' axis and dispatch over it (expert_parallel.py).
  on_mesh = (lambda: jax.set_mesh(mesh)) if mesh is not None else contextlib.nullcontext
  with on_mesh():
    state = _start(graphdef, weights, *inputs, kv_cache, jax.random.key(seed), max_new_tokens, params, stops,
                   speculative)
  # One device-to-host copy per call of what the host needs: the done flags, counts and tokens.
  done, counts, out = _fetch(state.done_B, state.count_B, state.out_BJ)
  emitted, steps = [1] * b, 0
  if on_step is not None:
    on_step([[int(x)] for x in out[:b, 0]])
  chunk = 1 if on_step is not None else max_new_tokens
  while not done.all():
    with on_mesh():
      state, taken = _steps(graphdef, weights, state, chunk, params, stops, speculative)
    taken, done, counts, out = _fetch(taken, state.done_B, state.count_B, state.out_BJ)
    steps += int(taken)
    if on_step is not None:
      on_step([out[r, emitted[r]:counts[r]].tolist() for r in range(b)])
      emitted = counts[:b].tolist()
  counts = np.minimum(counts, max_new_tokens)
  drafts, accepted = _fetch(state.drafts, state.accepted)
  return Generation([_until_stop(out[r, :counts[r]].tolist(), stops) for r in range(b)], steps, int(drafts),
                    int(accepted))


# model -> (its Variables, their arrays, (the model to decode with, its hashed GraphDef, its weights, empty
# caches)): a model decoded again with the same arrays in the same Variables (jax arrays are immutable: an
# update, by an optimizer, nnx.update or a load, puts new ones in) reuses them, held while the model lives; a
# model whose submodules are replaced by new ones is not noticed (as with nnx.cached_partial): decode a new
# model object instead. The decoder is the model itself, or for an unrolled one its per-layer copy; split once
# and the GraphDef hashed once (jax.jit hashes a static argument on every call). Measured on the demo's shapes
# (fp32, 64 new tokens, 2 cores): a call at batch 1 took 70.6 ms unstacking each time, 48.6 ms reusing the
# copy; held split and hash, a 2-new-token call took 12.2 ms against 21.5 splitting each call (trained demo,
# median of 9); the Variables' own arrays compared instead of nnx.state's leaves, 3.4 ms less per call.
_DECODERS = weakref.WeakKeyDictionary()


def _decoder(model: DeepSeekV3) -> tuple[DeepSeekV3, '_Static', nnx.State, dict]:
  held = _DECODERS.get(model)
  if held is not None and all(v.get_raw_value() is a for v, a in zip(held[0], held[1])):
    decoder, graphdef, weights, caches = held[2]
  else:
    variables = [v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)]
    decoder = None if model.rt.scan_layers else model.unstacked()  # None: the model (a value must not hold its key)
    graphdef, weights = nnx.split(decoder or model)
    graphdef, caches = _Static(graphdef), {}
    _DECODERS[model] = (variables, [v.get_raw_value() for v in variables], (decoder, graphdef, weights, caches))
  return decoder or model, graphdef, weights, caches


def _empty_cache(graphdef: '_Static', weights, caches: dict, rows: int, length: int, form: CacheForm,
                 dtype) -> Cache:
  """The decoder's init_cache(...) as one compiled call, its maker held per decoder and shape (created eagerly,
  the zeros cost ~1.6 ms of dispatch per generate call at the demo's shapes). The maker holds the weights'
  shapes, not the model."""
  key = (rows, length, form, None if dtype is None else jnp.dtype(dtype))
  if key not in caches:
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), weights)
    caches[key] = jax.jit(lambda: _merge(graphdef, shapes).init_cache(rows, length, form, dtype))
  return caches[key]()


def _placed(model: DeepSeekV3, mesh, allow_replicated: bool) -> DeepSeekV3:
  """The model with its weights in the mesh's shardings (a no-op for weights already there)."""
  graphdef, weights = nnx.split(model)
  return nnx.merge(graphdef, jax.device_put(weights, sharding.state_shardings(weights, mesh, allow_replicated)))


def _on_rows(array_B, mesh) -> jax.Array:
  """A host array split by rows over the mesh's batch axes; every process gives the same whole array."""
  where = sharding.batch_sharding(mesh, array_B.ndim, 0)
  return jax.make_array_from_callback(array_B.shape, where, lambda index: array_B[index])


def _fetch(*arrays) -> tuple:
  """The arrays on the host, whole: with several processes, each gathers the rows the others hold."""
  if jax.process_count() == 1:
    return jax.device_get(arrays)
  from jax.experimental import multihost_utils
  return tuple(multihost_utils.process_allgather(arrays, tiled=True))


def _check(cfg, prompts, max_new_tokens, params, speculative):
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('generate: every prompt needs at least one token')
  if max_new_tokens < 1:
    raise ValueError(f'generate: max_new_tokens={max_new_tokens} must be >= 1')
  longest = max(len(p) for p in prompts)
  room = max_new_limit(cfg, longest, speculative)
  if max_new_tokens > room:
    extra = ' + 1 (a speculative step writes its draft one position further)' if speculative else ''
    raise ValueError(f'generate: prompt length {longest} + max_new_tokens {max_new_tokens}{extra} exceeds the '
                     f'model max_seq_len {cfg.max_seq_len}: at most {max(room, 0)} new tokens fit')
  if speculative and not cfg.n_mtp_layers:
    raise ValueError('generate: speculative decoding drafts with the MTP module; this model has none')
  check_params(params, cfg.vocab_size)


def max_new_limit(cfg, prompt_length: int, speculative: bool = False) -> int:
  """The most tokens generate() can add to a prompt of this length within cfg.max_seq_len."""
  return cfg.max_seq_len - prompt_length - (1 if speculative else 0)


def _until_stop(tokens, stops):
  for i, token in enumerate(tokens):
    if token in stops:
      return tokens[:i + 1]
  return tokens


def _is_stop(tokens_B, stops):
  return jnp.isin(tokens_B, jnp.asarray(stops, jnp.int32)) if stops else jnp.zeros(tokens_B.shape, bool)


class _Static:
  """A static jit argument whose hash is computed once."""

  def __init__(self, value):
    self.value, self._hash = value, hash(value)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return isinstance(other, _Static) and (self is other or self.value == other.value)


def _merge(graphdef: _Static, weights):
  return nnx.merge(graphdef.value, weights)


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9, 10))
def _start(graphdef, weights, tokens_BT, lengths_B, live_B, cache, key, max_new, params, stops,
           speculative) -> _State:
  """Prefill, the first token from each row's last prompt position, and (speculative) the first draft. Rows
  not live (padding) start done."""
  model = _merge(graphdef, weights)
  b = tokens_BT.shape[0]
  rows_B = jnp.arange(b)
  out = model.forward(tokens_BT, cache=cache)  # prefill: positions 0 .. T - 1 of every row
  cache = out.cache
  key, first_key, draft_key = jax.random.split(key, 3)
  # The head at each row's last prompt position only (the logits of the others are never computed).
  token_B = sample(model.head(out.hidden_BTD[rows_B, lengths_B - 1]), first_key, params)
  out_BJ = jnp.zeros((b, max_new + 1), jnp.int32).at[:, 0].set(token_B)
  done_B = _is_stop(token_B, stops) | (max_new <= 1) | ~live_B
  draft_B = jnp.zeros((b,), jnp.int32)
  draft_logits_BW = jnp.zeros((b, model.cfg.vocab_size), jnp.float32)
  if speculative:
    # MTP position i reads token i + 1: the prompt shifted left, and the token just sampled after its end.
    shifted_BT = jnp.pad(tokens_BT[:, 1:], ((0, 0), (0, 1)))
    next_BT = jnp.where(jnp.arange(tokens_BT.shape[1]) == (lengths_B - 1)[:, None], token_B[:, None], shifted_BT)
    mtp = model.mtp_forward(next_BT, out.hidden_BTD, cache=cache)
    cache = mtp.cache
    draft_logits_BW = model.head(mtp.hidden_PBTD[0, rows_B, lengths_B - 1]).astype(jnp.float32)  # one row
    draft_B = sample(draft_logits_BW, draft_key, params)
  zero = jnp.zeros((), jnp.int32)
  return _State(cache, token_B, lengths_B, key, out_BJ, jnp.ones((b,), jnp.int32), done_B, draft_B,
                draft_logits_BW, zero, zero)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6), donate_argnums=2)
def _steps(graphdef, weights, state: _State, n: int, params, stops, speculative) -> tuple[_State, jax.Array]:
  """Up to n decode steps, fewer when every row is done: (state, steps taken)."""
  model = _merge(graphdef, weights)
  step = _speculative_step if speculative else _plain_step

  def body(carry):
    taken, s = carry
    return taken + 1, step(model, s, params, stops)

  taken, state = jax.lax.while_loop(lambda c: (c[0] < n) & ~jnp.all(c[1].done_B), body, (0, state))
  return state, taken


def _emit(state: _State, token_B, emit_B, stops):
  """Appends token to the rows where emit is set; a stop token or a full budget ends a row."""
  max_new = state.out_BJ.shape[1] - 1
  rows_B = jnp.arange(token_B.shape[0])
  emit_B = emit_B & ~state.done_B
  out_BJ = state.out_BJ.at[rows_B, jnp.where(emit_B, state.count_B, max_new)].set(
      jnp.where(emit_B, token_B, state.out_BJ[rows_B, max_new]))
  count_B = state.count_B + emit_B
  done_B = state.done_B | (emit_B & _is_stop(token_B, stops)) | (count_B >= max_new)
  return state._replace(out_BJ=out_BJ, count_B=count_B, done_B=done_B)


def _plain_step(model, state: _State, params, stops) -> _State:
  out = model.forward(state.token_B[:, None], state.position_B[:, None], state.cache)
  key, sample_key = jax.random.split(state.key)
  token_B = sample(out.logits_BTW[:, 0], sample_key, params)
  state = state._replace(cache=out.cache, key=key, token_B=token_B, position_B=state.position_B + 1)
  return _emit(state, token_B, jnp.ones_like(state.done_B), stops)


def _speculative_step(model, state: _State, params, stops) -> _State:
  tokens_BT = jnp.stack([state.token_B, state.draft_B], axis=1)
  positions_BT = jnp.stack([state.position_B, state.position_B + 1], axis=1)
  out = model.forward(tokens_BT, positions_BT, state.cache)
  key, accept_key, next_key, draft_key = jax.random.split(state.key, 4)
  accepted_B, first_B = accept_draft(out.logits_BTW[:, 0], state.draft_logits_BW, state.draft_B, accept_key,
                                     params)
  second_B = sample(out.logits_BTW[:, 1], next_key, params)  # the token after a kept draft
  # The MTP module at the two positions reads the tokens that follow them: valid as far as they were kept.
  mtp = model.mtp_forward(jnp.stack([first_B, second_B], axis=1), out.hidden_BTD, positions_BT, out.cache)
  # Only the newest kept position drafts: one head product per row.
  h_BTD = mtp.hidden_PBTD[0]
  draft_logits_BW = model.head(jnp.where(accepted_B[:, None], h_BTD[:, 1], h_BTD[:, 0])).astype(jnp.float32)
  active_B = ~state.done_B
  state = state._replace(
      cache=mtp.cache, key=key, token_B=jnp.where(accepted_B, second_B, first_B),
      position_B=state.position_B + 1 + accepted_B, draft_logits_BW=draft_logits_BW,
      draft_B=sample(draft_logits_BW, draft_key, params), drafts=state.drafts + active_B.sum(),
      accepted=state.accepted + (accepted_B & active_B).sum())
  state = _emit(state, first_B, jnp.ones_like(accepted_B), stops)
  return _emit(state, second_B, accepted_B, stops)
