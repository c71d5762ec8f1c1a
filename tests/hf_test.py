"""HF checkpoint I/O: FP8 loading (against transformers and the official formula), save/load round trips,
and a clear error for every kind of bad checkpoint."""

import json
import math
import os
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from deepseek_jax.config import PRESETS, Runtime
from deepseek_jax.hf import HOST_BLOCK_TENSORS, dequantize_fp8, load_hf, save_hf
from deepseek_jax.safetensors_io import SafetensorsDir, write_dir
from tests.helpers import forward, mtp_forward, random_model, require

torch = require('torch')
transformers = require('transformers')

TINY = PRESETS['tiny']
FP8_CONFIG = {'activation_scheme': 'dynamic', 'fmt': 'e4m3', 'quant_method': 'fp8', 'weight_block_size': [128, 128]}


def quantize_fp8(w, block=128):
  """DeepSeek's weight format: e4m3 values and one fp32 scale (amax / 448) per 128x128 block, edges partial."""
  rows, cols = w.shape
  br, bc = -(-rows // block), -(-cols // block)
  padded = np.zeros((br * block, bc * block), np.float32)
  padded[:rows, :cols] = w
  blocks = padded.reshape(br, block, bc, block)
  scale = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-4) / 448.0
  q = np.clip(blocks / scale[:, None, :, None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
  return q.reshape(br * block, bc * block)[:rows, :cols], scale.astype(np.float32)


def read_all(path):
  store = SafetensorsDir(path)
  return {name: np.array(store.read(name)) for name in sorted(store.names())}


def write_all(path, tensors, config):
  write_dir(path, [(n, a.shape, a.dtype, lambda a=a: a) for n, a in tensors.items()])
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f)


def hf_tiny_checkpoint(path, **overrides):
  """A random transformers DeepseekV3 checkpoint; returns its path and config dict."""
  config = transformers.DeepseekV3Config(**{
      'vocab_size': 256, 'hidden_size': 256, 'intermediate_size': 384, 'moe_intermediate_size': 128,
      'num_hidden_layers': 2, 'first_k_dense_replace': 1, 'num_attention_heads': 2, 'num_key_value_heads': 2,
      'n_routed_experts': 4, 'num_experts_per_tok': 2, 'n_group': 2, 'topk_group': 1, 'n_shared_experts': 1,
      'q_lora_rank': 128, 'kv_lora_rank': 64, 'qk_nope_head_dim': 64, 'qk_rope_head_dim': 64, 'v_head_dim': 64,
      'max_position_embeddings': 128, 'num_nextn_predict_layers': 0, **overrides})
  torch.manual_seed(0)
  model = transformers.DeepseekV3ForCausalLM(config)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0, 0.05)
  model.save_pretrained(path)
  with open(os.path.join(path, 'config.json')) as f:
    return json.load(f)


def write_fp8_copy(src, dst, config):
  """src's checkpoint quantized like the release: every projection FP8 (with weight_scale_inv); embedding,
  head, router and norms stay high precision. Returns the tensors written."""
  tensors = {}
  for name, w in read_all(src).items():
    if w.ndim == 2 and not any(s in name for s in ('embed_tokens', 'lm_head', 'mlp.gate.weight')):
      tensors[name], tensors[name + '_scale_inv'] = quantize_fp8(w)
    else:
      tensors[name] = w
  write_all(dst, tensors, {**config, 'quantization_config': FP8_CONFIG})
  return tensors


class FP8Test(parameterized.TestCase):

  def test_loads_exactly_what_transformers_loads(self):
    src, dst = (os.path.join(self.create_tempdir().full_path, n) for n in ('bf', 'fp8'))
    tensors = write_fp8_copy(src, dst, hf_tiny_checkpoint(src))
    self.assertGreater(sum(n.endswith('_scale_inv') for n in tensors), 10)

    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(dst, dtype=torch.float32)  # CPU: dequantizes
    hf_state = {k: v.numpy() for k, v in hf.state_dict().items()}
    cfg, model = load_hf(dst)
    ours = {'/'.join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
    experts = lambda name: ours[f'moe_layers/ffn/experts/{name}'][0].transpose(0, 2, 1)  # [E, out, in]
    pairs = {  # transformers name -> our weight in its [out, in] layout
        'model.layers.1.self_attn.kv_b_proj.weight': ours['moe_layers/attn/wkv_b/kernel'][0].T,
        'model.layers.0.self_attn.q_b_proj.weight': ours['dense_layers/attn/wq_b/kernel'][0].T,
        'model.layers.0.self_attn.kv_a_proj_with_mqa.weight': ours['dense_layers/attn/wkv_a/kernel'][0].T,
        'model.layers.0.mlp.down_proj.weight': ours['dense_layers/ffn/w2/kernel'][0].T,
        'model.layers.1.mlp.shared_experts.gate_proj.weight': ours['moe_layers/ffn/shared_experts/w1/kernel'][0].T,
        # transformers fuses gate (w1) and up (w3) per expert as gate_up_proj [E, 2I, D]
        'model.layers.1.mlp.experts.gate_up_proj': np.concatenate([experts('w1'), experts('w3')], axis=1),
        'model.layers.1.mlp.experts.down_proj': experts('w2'),
    }
    for hf_name, got in pairs.items():
      np.testing.assert_array_equal(got, hf_state[hf_name], err_msg=hf_name)

  def test_fp8_weights_load_without_dequantizing(self):
    """fp8_weights=True keeps the file's codes and scales (padded, transposed to [in, out]); the model then
    computes exactly what the dequantized one does, and saves back to the same bytes."""
    src, dst, out = (os.path.join(self.create_tempdir().full_path, n) for n in ('bf', 'fp8', 'resaved'))
    # hidden 192 and kv_lora_rank 80 (+64 rope): partial edge blocks everywhere
    tensors = write_fp8_copy(src, dst, hf_tiny_checkpoint(src, hidden_size=192, kv_lora_rank=80))
    # One expert path for both (the native CPU kernel reads float weights only): the same code, the same bits.
    _, dequantized = load_hf(dst, Runtime(gmm_impl='host'))
    cfg, held = load_hf(dst, Runtime(fp8_weights=True, gmm_impl='host'))
    wkv_a = held.dense_layers.attn.wkv_a
    self.assertEqual((wkv_a.kernel.dtype, wkv_a.kernel.shape), (jnp.float8_e4m3fn, (1, 256, 256)))
    stored = tensors['model.layers.0.self_attn.kv_a_proj_with_mqa.weight']  # [144, 192]
    np.testing.assert_array_equal(np.asarray(wkv_a.kernel[...][0])[:192, :144].view(np.uint8),
                                  stored.T.view(np.uint8))
    self.assertFalse(np.any(np.asarray(wkv_a.kernel[...][0])[192:].view(np.uint8)))  # zero padding
    self.assertEqual(held.moe_layers.ffn.experts.w1.dtype, jnp.float8_e4m3fn)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 20)))
    np.testing.assert_array_equal(forward(held, tokens).logits_BTW, forward(dequantized, tokens).logits_BTW)
    save_hf(cfg, held, out)
    resaved = read_all(out)
    self.assertEqual(set(resaved), set(tensors))
    for name, want in tensors.items():
      np.testing.assert_array_equal(np.asarray(resaved[name]).view(np.uint8), np.asarray(want).view(np.uint8),
                                    err_msg=name)

  def test_partial_edge_blocks_follow_the_official_formula(self):
    # transformers 5.23 derives the block size from the scale grid (rows // grid_rows), which is wrong when a
    # dimension is not a multiple of 128: V3's kv_a_proj_with_mqa is [576, 7168] with a [5, 56] grid.
    rng = np.random.default_rng(0)
    for shape in [(192, 200), (576, 300), (100, 129)]:
      w = rng.standard_normal(shape).astype(np.float32) * rng.choice([0.01, 1, 30], size=shape)
      q, s = quantize_fp8(w)
      got = dequantize_fp8(q, s)
      want = np.empty(shape, np.float32)
      for i in range(shape[0]):
        for j in range(0, shape[1], 7):
          want[i, j] = np.float32(q[i, j]) * s[i // 128, j // 128]
      np.testing.assert_array_equal(got[:, ::7], want[:, ::7])
      # e4m3 keeps 3 mantissa bits (relative error <= 2^-4) down to subnormals spaced 2^-9 * scale.
      scale = np.repeat(np.repeat(s, 128, 0), 128, 1)[:shape[0], :shape[1]]
      self.assertTrue(np.all(np.abs(got - w) <= 2**-4 * np.abs(w) + 2**-9 * scale))


class RoundTripTest(parameterized.TestCase):

  @parameterized.parameters(('float32', 10**9), ('bfloat16', 20_000))
  def test_save_load_is_exact(self, dtype, shard_bytes):
    cfg, rt = TINY, Runtime(param_dtype=dtype, dtype=dtype)
    model = random_model(cfg, seed=1, rt=rt)
    path = self.create_tempdir().full_path
    save_hf(cfg, model, path, max_shard_bytes=shard_bytes)
    self.assertEqual(os.path.exists(os.path.join(path, 'model.safetensors.index.json')), shard_bytes < 10**9)
    cfg2, model2 = load_hf(path, rt)
    self.assertEqual(cfg2, cfg.replace(norm_topk_prob=cfg.renormalize_topk))
    a, b = (dict(nnx.to_flat_state(nnx.state(m))) for m in (model, model2))
    self.assertEqual(a.keys(), b.keys())
    for key in a:
      self.assertEqual(a[key].dtype, b[key].dtype, key)
      np.testing.assert_array_equal(np.asarray(a[key][...]), np.asarray(b[key][...]), err_msg=str(key))
    tokens = jnp.arange(24).reshape(2, 12) % cfg.vocab_size
    np.testing.assert_array_equal(mtp_forward(model, tokens).logits_PBTW, mtp_forward(model2, tokens).logits_PBTW)

  def test_transformers_reads_what_we_write(self):
    model = random_model(TINY, seed=2)
    path = self.create_tempdir().full_path
    save_hf(TINY, model, path)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 20))
    with torch.no_grad():
      want = hf(torch.from_numpy(tokens)).logits.numpy()
    got = np.asarray(forward(model, jnp.asarray(tokens)).logits_BTW)
    self.assertLessEqual(np.abs(got - want).max(), 1e-4 * np.abs(want).max())


class BadCheckpointTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.good = os.path.join(self.create_tempdir().full_path, 'good')
    self.config = hf_tiny_checkpoint(self.good)
    self.tensors = read_all(self.good)
    self.bad = os.path.join(self.create_tempdir().full_path, 'bad')

  def assert_load_error(self, tensors, message, config=None):
    write_all(self.bad, tensors, config or self.config)
    with self.assertRaisesRegex(ValueError, message):
      load_hf(self.bad)

  def test_good_checkpoint_loads_every_tensor(self):
    cfg, model = load_hf(self.good)
    out = os.path.join(self.create_tempdir().full_path, 'resaved')
    save_hf(cfg, model, out)  # what we loaded, written back: the same tensors, bit for bit
    resaved = read_all(out)
    self.assertEqual(set(resaved), set(self.tensors))
    for name, want in self.tensors.items():
      np.testing.assert_array_equal(resaved[name], want, err_msg=name)

  def test_missing_tensor(self):
    name = 'model.layers.1.mlp.experts.3.up_proj.weight'
    self.assert_load_error({k: v for k, v in self.tensors.items() if k != name}, f'missing tensor {name!r}')

  def test_wrong_shape(self):
    name = 'model.layers.0.self_attn.kv_b_proj.weight'
    self.assert_load_error({**self.tensors, name: self.tensors[name][:-1]}, f'{name!r} has shape')

  def test_unexpected_dtype(self):
    name = 'model.norm.weight'
    self.assert_load_error({**self.tensors, name: self.tensors[name].astype(np.int32)}, f'{name!r} has dtype I32')

  def test_unknown_tensor(self):
    self.assert_load_error({**self.tensors, 'model.layers.0.mlp.extra.weight': np.zeros(3, np.float32)},
                           'model.layers.0.mlp.extra.weight')

  def test_fp8_without_scale(self):
    name = 'model.layers.0.self_attn.o_proj.weight'
    q, _ = quantize_fp8(self.tensors[name])
    self.assert_load_error({**self.tensors, name: q}, f'{name + "_scale_inv"!r} is missing')

  def test_fp8_bad_scale_shape(self):
    name = 'model.layers.0.self_attn.o_proj.weight'
    q, s = quantize_fp8(self.tensors[name])
    self.assert_load_error({**self.tensors, name: q, name + '_scale_inv': s[:, :1].repeat(3, 1)},
                           f'{name + "_scale_inv"!r} has shape')

  def test_scale_for_unquantized_weight(self):
    name = 'model.layers.0.self_attn.o_proj.weight'
    self.assert_load_error({**self.tensors, name + '_scale_inv': np.ones((1, 1), np.float32)}, 'not F8_E4M3')

  def test_bad_quantization_block(self):
    self.assert_load_error(self.tensors, 'weight_block_size',
                           {**self.config, 'quantization_config': {**FP8_CONFIG, 'weight_block_size': [64, 64]}})

  def test_index_lists_missing_file(self):
    write_all(self.bad, self.tensors, self.config)
    with open(os.path.join(self.bad, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'weight_map': {'model.norm.weight': 'model-00002-of-00002.safetensors'}}, f)
    with self.assertRaisesRegex(FileNotFoundError, 'model-00002-of-00002'):
      load_hf(self.bad)

  def test_missing_config(self):
    os.remove(os.path.join(self.good, 'config.json'))
    with self.assertRaisesRegex(FileNotFoundError, 'config.json'):
      load_hf(self.good)


class DamagedFilesTest(parameterized.TestCase):
  """Files that are not what their names say: each error names the file (and the tensor or field)."""

  def setUp(self):
    super().setUp()
    self.dir = os.path.join(self.create_tempdir().full_path, 'ckpt')
    self.config = hf_tiny_checkpoint(self.dir)
    self.file = os.path.join(self.dir, 'model.safetensors')
    with open(self.file, 'rb') as f:
      self.bytes = f.read()
    (self.header_length,) = struct.unpack('<Q', self.bytes[:8])

  def overwrite(self, content: bytes):
    with open(self.file, 'wb') as f:
      f.write(content)

  def test_truncated_mid_file(self):
    self.overwrite(self.bytes[:len(self.bytes) // 2])
    with self.assertRaisesRegex(ValueError, f'{self.file} is not a complete safetensors file: tensor .* needs bytes '
                                r'\[\d+, \d+\) of a \d+-byte file \(truncated\)'):
      load_hf(self.dir)

  def test_truncated_inside_the_header(self):
    self.overwrite(self.bytes[:8 + self.header_length // 2])
    with self.assertRaisesRegex(ValueError, f'{self.file} is not a complete safetensors file: its header length '
                                f'{self.header_length} exceeds'):
      load_hf(self.dir)

  def test_zero_bytes(self):
    self.overwrite(b'')
    with self.assertRaisesRegex(ValueError, f'{self.file} is not a complete safetensors file: 0 bytes'):
      load_hf(self.dir)

  def test_garbage_header_length(self):
    self.overwrite(struct.pack('<Q', 2**62) + self.bytes[8:])
    with self.assertRaisesRegex(ValueError, f'header length {2**62} exceeds'):
      load_hf(self.dir)

  def test_garbage_header(self):
    self.overwrite(self.bytes[:8] + b'\xff' * self.header_length + self.bytes[8 + self.header_length:])
    with self.assertRaisesRegex(ValueError, f'{self.file} is not a complete safetensors file: its header is not JSON'):
      load_hf(self.dir)

  def test_a_pickle_named_safetensors(self):
    import pickle
    self.overwrite(pickle.dumps({'model.norm.weight': np.ones(4, np.float32)}))  # never unpickled
    with self.assertRaisesRegex(ValueError, f'{self.file} is not a complete safetensors file'):
      load_hf(self.dir)

  def test_malformed_config_json(self):
    with open(os.path.join(self.dir, 'config.json'), 'w') as f:
      f.write('{"hidden_size": 64,')
    with self.assertRaisesRegex(ValueError, f'{self.dir}/config.json is not valid JSON'):
      load_hf(self.dir)

  @parameterized.parameters(('hidden_size', '64', r"hidden_size='64' must be a number"),
                            ('num_hidden_layers', 3.0, r'ModelConfig.n_layers: must be an int \(got 3.0\)'),
                            ('routed_scaling_factor', 'x', r"routed_scaling_factor='x' must be a number"))
  def test_sizes_of_the_wrong_type(self, key, value, message):
    with open(os.path.join(self.dir, 'config.json'), 'w') as f:
      json.dump({**self.config, key: value}, f)
    with self.assertRaisesRegex(ValueError, f'{self.dir}/config.json: .*{message}'):
      load_hf(self.dir)


class ShardedLoadTest(parameterized.TestCase):
  """load_hf straight into a mesh's shardings, one slice of one tensor at a time."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    import tempfile
    cls.src = os.path.join(tempfile.mkdtemp(), 'src')
    # 2 x 128 model rows and 3 x 128 FFN columns: device slices cut across FP8 blocks; 32 experts: the stack
    # of one layer's experts is 32 x the largest single tensor.
    cls.config = hf_tiny_checkpoint(cls.src, n_routed_experts=32, n_group=1, topk_group=1)
    cls.fp8 = os.path.join(os.path.dirname(cls.src), 'fp8')
    cls.tensors = write_fp8_copy(cls.src, cls.fp8, cls.config)

  def test_fp8_onto_a_mesh_equals_the_official_dequantization(self):
    from deepseek_jax import sharding
    mesh = sharding.make_mesh(data=2, expert=4)
    _, one = load_hf(self.fp8)  # one device
    report = {}
    cfg, spread = load_hf(self.fp8, mesh=mesh, report=report)
    # Every byte of the model read once: blocks that several devices hold are copied between them.
    self.assertEqual(report['bytes_read'], report['total_bytes'])
    want_shardings = dict(nnx.to_flat_state(sharding.state_shardings(nnx.state(spread), mesh)))
    for path, variable in nnx.to_flat_state(nnx.state(spread)):
      self.assertEqual(variable[...].sharding, want_shardings[path].get_value(), path)
    chex_equal = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(one)), nnx.to_flat_state(nnx.state(spread))):
      chex_equal(a[...], b[...])
    # Against the official formula on whole tensors: a dense FFN weight and one expert's.
    for name, ours in (('model.layers.0.mlp.gate_proj.weight', spread.dense_layers.ffn.w1.kernel[...][0]),
                       ('model.layers.1.mlp.experts.17.down_proj.weight', spread.moe_layers.ffn.experts.w2[...][0, 17])):
      want = dequantize_fp8(self.tensors[name], self.tensors[name + '_scale_inv']).T
      np.testing.assert_array_equal(np.asarray(ours), want, err_msg=name)
    self.assertEqual(spread.moe_layers.ffn.experts.w2[...].sharding.spec[1], 'expert')

  def test_fp8_held_weights_onto_a_mesh_equal_the_one_device_load(self):
    from deepseek_jax import sharding
    rt = Runtime(fp8_weights=True)
    _, one = load_hf(self.fp8, rt)
    mesh = sharding.make_mesh(data=2, expert=4)
    report = {}
    _, spread = load_hf(self.fp8, rt, mesh=mesh, report=report)
    self.assertEqual(report['bytes_read'], report['total_bytes'])  # each block of the codes read once
    self.assertEqual(spread.moe_layers.ffn.experts.w1.dtype, jnp.float8_e4m3fn)
    # Codes and scales bit for bit, the device slices cutting across 128-blocks and the padding.
    bits = lambda variable: np.asarray(variable[...]).view(np.uint8)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(one)), nnx.to_flat_state(nnx.state(spread))):
      np.testing.assert_array_equal(bits(a), bits(b), err_msg=str(path))
    self.assertGreater(len(spread.moe_layers.ffn.experts.w1[...].sharding.device_set), 1)
    # Decoding with FP8-held weights on the mesh (the README's --fp8_weights --mesh.expert example).
    from deepseek_jax.generate import generate
    prompts = [[5, 17, 200, 3], [42, 8], [7]]
    self.assertEqual(generate(spread, prompts, 6, mesh=mesh).tokens, generate(one, prompts, 6).tokens)

  def test_host_memory_is_one_tensor_slice_not_a_stack(self):
    """Traced in a fresh process, so no other test's threads allocate during the traced window. On busy cores
    this caught transfers in flight holding their host blocks (1.7 MB here) until load_hf waited for each."""
    import subprocess
    import sys
    store = SafetensorsDir(self.src)
    largest = max(math.prod(store.shape(n)) * 4 for n in store.names())  # fp32, as loaded
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, '-c', _TRACED_LOAD, self.src], cwd=repo, capture_output=True,
                          text=True, timeout=300)
    self.assertEqual(done.returncode, 0, done.stderr[-3000:])
    for mesh, r in json.loads(done.stdout.strip().splitlines()[-1]).items():
      # What the loader held at once on the host, beyond what it still holds: a block of at most
      # HOST_BLOCK_TENSORS of the largest tensor plus the slice being read into it, where a loader assembling
      # the stack of one layer's 32 experts on the host would hold 10 times the largest tensor.
      self.assertGreater(r['stack_bytes'], 10 * largest, mesh)
      self.assertLess(r['peak_above_held'], (HOST_BLOCK_TENSORS + 1.5) * largest, mesh)


_TRACED_LOAD = r'''
import json, sys, tracemalloc
import jax
jax.config.update('jax_num_cpu_devices', 8)
from deepseek_jax import sharding
from deepseek_jax.hf import load_hf
out = {}
for name, mesh in (('one device', None), ('2x4 mesh', sharding.make_mesh(data=2, expert=4))):
  tracemalloc.start()
  _, model = load_hf(sys.argv[1], mesh=mesh)
  now, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  out[name] = {'peak_above_held': peak - now, 'stack_bytes': model.moe_layers.ffn.experts.w1[...].size * 4}
print(json.dumps(out))
'''

_TWO_PROCESS_LOAD = r'''
import json, sys
import jax
jax.config.update('jax_num_cpu_devices', 4)
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]),
                           initialization_timeout=60)
import numpy as np
from flax import nnx
from deepseek_jax import sharding
from deepseek_jax.hf import load_hf
report = {}
_, model = load_hf(sys.argv[3], mesh=sharding.make_mesh(data=2, expert=4), report=report)
_, whole = load_hf(sys.argv[3])  # this process's first device, all of it: the reference
distinct = {}
for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(whole))):
  for shard in a[...].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(b[...])[shard.index], err_msg=str(path))
    distinct[(path, str(shard.index))] = shard.data.nbytes
print(json.dumps({**report, 'distinct_local_bytes': sum(distinct.values())}))
'''


class TwoProcessLoadTest(absltest.TestCase):

  def test_each_process_reads_only_its_own_devices_blocks(self):
    import socket
    import subprocess
    import sys
    import tempfile
    path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    hf_tiny_checkpoint(path, n_routed_experts=8, n_group=1, topk_group=1)
    with socket.socket() as s:  # a free loopback port
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    processes = [subprocess.Popen([sys.executable, '-c', _TWO_PROCESS_LOAD, f'127.0.0.1:{port}', str(i), path],
                                  cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
    try:
      outputs = [p.communicate(timeout=300) for p in processes]
    finally:
      for p in processes:
        p.kill()
    reports = []
    for p, (out, err) in zip(processes, outputs):
      self.assertEqual(p.returncode, 0, err[-3000:])
      reports.append(json.loads(out.strip().splitlines()[-1]))
    for r in reports:
      # Exactly this process's distinct blocks were read (each once), and that is about half the model:
      # 'data' splits the devices between the processes; what 'data' cannot split, each process reads.
      self.assertEqual(r['bytes_read'], r['distinct_local_bytes'])
      self.assertLess(r['bytes_read'], 0.6 * r['total_bytes'])
    self.assertEqual(reports[0]['total_bytes'], reports[1]['total_bytes'])
