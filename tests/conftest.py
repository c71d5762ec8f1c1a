"""Test session setup: 8 CPU devices (real meshes, shard_map and collectives), offline Hugging Face, and a
compile-time budget.

The suite runs small models through many distinct programs, so XLA compilation, not execution, is most of
its time. Two settings, inherited by the launchers the tests start as subprocesses:
- XLA:CPU's classic loop emitters at LLVM -O0 instead of its MLIR fusion emitters at -O2: the tiny train step
  compiles several times faster and runs a few times slower (the numbers are in the issue [1/5] note);
  results are the same to float rounding, which every tolerance in the suite allows.
- a persistent compilation cache in a fresh directory for this run: a program compiled once (the same
  model, step and shapes in another test, or in another launcher process) is loaded instead of recompiled.
"""

import os
import tempfile

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), '--xla_cpu_use_fusion_emitters=false',
                                    '--xla_backend_optimization_level=0']).strip()
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='deepseek_jax_test_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # absltest's create_tempdir reads --test_tmpdir; pytest never parses absl flags
