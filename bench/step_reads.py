"""What a decode step reads, for the decoding benchmarks: each MoE layer's routing of a teacher-forced
forward, and the bytes of the model's weights by kind."""

import numpy as np


def routing(model, tokens_BT, mtp: bool = False) -> list:
  """Each MoE layer's routed experts [B, T, K] over tokens_BT, the trunk's in order and then (mtp) the MTP
  block's: the routing greedy decoding computed over those tokens. The model runs eagerly on per-layer blocks,
  so a spy on MoE.__call__ sees every layer."""
  import jax.numpy as jnp
  from deepseek_jax import moe
  seen = []
  call = moe.MoE.__call__

  def spy(self, x_BTD):
    experts_XK = self.gate(x_BTD.reshape(-1, x_BTD.shape[-1])).experts_XK
    seen.append(np.asarray(experts_XK).reshape(*x_BTD.shape[:2], -1))
    return call(self, x_BTD)

  moe.MoE.__call__ = spy
  try:
    decoder = model.unstacked()
    tokens_BT = jnp.asarray(tokens_BT)
    hidden_BTD = decoder.forward(tokens_BT).hidden_BTD
    if mtp:  # MTP position i reads token i + 1
      decoder.mtp_forward(jnp.pad(tokens_BT[:, 1:], ((0, 0), (0, 1))), hidden_BTD)
  finally:
    moe.MoE.__call__ = call
  return seen


def weight_bytes(model) -> tuple[int, int, int]:
  """(every weight a plain step reads but the routed experts, the MTP block's but its routed experts, one
  routed expert of one layer: its w1, w2 and w3, codes and scales when held quantized), in bytes; the
  embedding (one row per token) left out."""
  from flax import nnx
  from deepseek_jax.layers import HeldWeight
  dense, mtp, expert = 0, 0, 0
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, HeldWeight))):
    names = [str(p) for p in path]
    nbytes = value[...].nbytes
    if names[0] == 'embed':
      continue
    if 'experts' in names and 'shared_experts' not in names:
      if names[0] != 'mtp':  # [layers, E, ...]: the MTP block's experts are the same size
        expert += nbytes // (value.shape[0] * value.shape[1])
    elif names[0] == 'mtp':
      mtp += nbytes
    else:
      dense += nbytes
  return dense, mtp, expert
