"""DeepSeek-V3 671B pre-training, as the technical report describes it (§4.2, §3.3).

14.8T tokens of 4K-token sequences; AdamW (0.9, 0.95), weight decay 0.1, clip 1.0; LR 0 -> 2.2e-4 over the
first 2K steps, constant to 10T tokens, cosine to 2.2e-5 over 4.3T, 2.2e-5 for 333B, 7.3e-6 for the last 167B;
batch 3072 -> 15360 sequences over the first 469B tokens; gamma 0.001 for 14.3T then 0; alpha 1e-4; MTP
lambda 0.3 for 10T then 0.1; init std 0.006 (the preset). The FP8 recipe on every projection, fp32 master
weights, bf16 activations and Adam moments. The data is a pre-tokenized corpus (DeepSeek's 129K BPE ids as
uint32): set data.tokens_path.
"""

from configs.common import NEVER, base_config, pod_defaults

SEQ_LEN = 4096
BATCH_START, BATCH_END, RAMP_TOKENS, RAMP_MULTIPLE = 3072, 15360, 469e9, 1536
TOTAL_TOKENS = 14.8e12


def get_config():
  # Steps: the ramp consumes 469B tokens at ~(3072 + 15360) / 2 sequences a step, the rest runs at 15360.
  ramp_steps = int(RAMP_TOKENS / ((BATCH_START + BATCH_END) / 2 * SEQ_LEN))
  steps = ramp_steps + int((TOTAL_TOKENS - RAMP_TOKENS) / (BATCH_END * SEQ_LEN))
  config = base_config('v3-671b', steps=steps, batch_size=BATCH_END, seq_len=SEQ_LEN, peak_lr=2.2e-4,
                       warmup_tokens=2000 * BATCH_START * SEQ_LEN)  # 2K steps, all inside the first ramp stage
  pod_defaults(config)
  config.runtime.quant = 'fp8'  # FP8 mixed precision as trained (§3.3): fp8 GEMMs, fp32 master weights, bf16 moments
  config.batch_ramp = dict(start=BATCH_START, tokens=RAMP_TOKENS, multiple=RAMP_MULTIPLE)
  config.lr = dict(peak=2.2e-4, warmup_tokens=2000 * BATCH_START * SEQ_LEN, constant_until=10e12,
                   decay_tokens=4.3e12, end=2.2e-5, tail=[(333e9, 2.2e-5), (167e9, 7.3e-6)])
  config.gamma = [(14.3e12, 0.001), (NEVER, 0.0)]
  config.mtp_lambda = [(10e12, 0.3), (NEVER, 0.1)]
  return config
