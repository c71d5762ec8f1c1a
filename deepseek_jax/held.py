"""A model's routed experts re-held as packed 4-bit codes for decoding (quant4.py), from its own weights.

`load_hf` quantizes on load, one expert tensor at a time (rt.weights4); this converts a model already in
memory (a training run's restored weights: `launch.decode --workdir --weights4`), a layer stack at a time.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from deepseek_jax import quant4
from deepseek_jax.model import DeepSeekV3


def experts_4bit(model: DeepSeekV3, fmt: str, group: int = 0) -> DeepSeekV3:
  """The model with its routed experts (MTP's included) as `fmt` codes and scales (group 0: the format's
  default); every other weight is shared with `model`."""
  if model.rt.weights4 != 'none' or model.rt.fp8_weights:
    raise ValueError('experts_4bit: the model already holds quantized weights; convert its full-precision form')
  rt = model.rt.replace(weights4=fmt, weights4_group=group)
  target = nnx.eval_shape(lambda: DeepSeekV3(model.cfg, rt, nnx.Rngs(0)))
  graphdef, state = nnx.split(target)
  source = dict(nnx.to_flat_state(nnx.state(model)))
  for path, variable in nnx.to_flat_state(state):
    if path in source and source[path].dtype == variable.dtype:  # not an expert stack: shared as it is
      variable.set_value(source[path][...])
      continue
    scales = path[-1].endswith('_scale')
    weight = source[path[:-1] + (path[-1][:-len('_scale')],) if scales else path][...]
    packed = _quantize(weight, fmt, group or None)
    variable.set_value(packed.scales if scales else packed.codes)
  return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(w, fmt, group):
  return quant4.quantize(w, fmt, group)
