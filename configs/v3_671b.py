"""DeepSeek-V3 671B pre-training, as the technical report describes it (§4.2, §3.3).

14.8T tokens of 4K-token sequences; AdamW (0.9, 0.95), weight decay 0.1, clip 1.0; LR 0 -> 2.2e-4 over the
first 2K steps, constant to 10T tokens, cosine to 2.2e-5 over 4.3T, 2.2e-5 for 333B, 7.3e-6 for the last 167B;
batch 3072 -> 15360 sequences over the first 469B tokens; gamma 0.001 for 14.3T then 0; alpha 1e-4; MTP
lambda 0.3 for 10T then 0.1; init std 0.006 (the preset). The FP8 recipe on every projection, fp32 master
weights, bf16 activations and Adam moments. The data is a pre-tokenized corpus (DeepSeek's 129K BPE ids as
uint32): set data.tokens_path.
"""

from configs.common import base_config, pod_defaults
from deepseek_jax import schedules

SEQ_LEN = 4096
BATCH_START, BATCH_END, RAMP_TOKENS, RAMP_MULTIPLE = 3072, 15360, 469e9, 1536
TOTAL_TOKENS = 14.8e12


def get_config():
  # Steps: the ramp's sizes stepped through (rounded down to multiples of 1536) over 469B tokens, then 15360.
  ramp = dict(start=BATCH_START, ramp_tokens=RAMP_TOKENS, multiple=RAMP_MULTIPLE)
  steps = schedules.steps_for(TOTAL_TOKENS, SEQ_LEN, BATCH_END, ramp)
  # The LR, gamma and lambda of the paper as fractions of 14.8T (common.py); warmup: 2K steps of the ramp's
  # first batch size.
  config = base_config('v3-671b', steps=steps, batch_size=BATCH_END, seq_len=SEQ_LEN, peak_lr=2.2e-4,
                       warmup=2000 * BATCH_START * SEQ_LEN / TOTAL_TOKENS)
  pod_defaults(config)
  config.runtime.quant = 'fp8'  # FP8 mixed precision as trained (§3.3): fp8 GEMMs, fp32 master weights, bf16 moments
  config.batch_ramp = dict(start=BATCH_START, tokens=RAMP_TOKENS, multiple=RAMP_MULTIPLE)
  return config
