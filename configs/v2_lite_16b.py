"""DeepSeek-V2-Lite (16B) pre-training, as its model card describes it (DeepSeek-V2-Lite README §6).

5.7T tokens of 4K-token sequences at a constant 4608 sequences a step; AdamW (0.9, 0.95), weight decay 0.1,
clip 1.0; LR 0 -> 4.2e-4 over 2K steps, then multiplied by 0.316 after ~80% and again after ~90% of the tokens;
softmax routing without a correction bias (so gamma is unused) and an expert-level balance loss with
alpha 0.001; no MTP. The data is a pre-tokenized corpus (100K BPE ids as uint32): set data.tokens_path.
"""

from configs.common import NEVER, base_config, pod_defaults

SEQ_LEN, BATCH, TOTAL_TOKENS, PEAK = 4096, 4608, 5.7e12, 4.2e-4


def get_config():
  steps = int(TOTAL_TOKENS / (BATCH * SEQ_LEN))
  config = base_config('v2-lite-16b', steps=steps, batch_size=BATCH, seq_len=SEQ_LEN, peak_lr=PEAK,
                       warmup=2000 / steps)
  pod_defaults(config)
  # Step decay: no cosine stage (decay 0), two tail stages of ~10% of the run each.
  config.lr = dict(peak=PEAK, warmup=2000 / steps, constant_until=0.8, decay=0.0, end=PEAK,
                   tail=[(0.1, PEAK * 0.316), (0.1, PEAK * 0.316**2)])
  config.gamma = [(NEVER, 0.0)]
  config.mtp_lambda = [(NEVER, 0.0)]
  config.balance_alpha = 1e-3
  return config
