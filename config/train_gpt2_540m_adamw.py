# Sophia paper (Liu et al. 2023), Table 2 / Fig. 1 & 4: 540M GPT-2 on OpenWebText with AdamW,
# 100K steps x 480 sequences x 1024 tokens (49B tokens), warmup 2K, cosine to 0.05x peak, clip 1.0, bf16.
# Cost: about 398 A100-hours (8 x A100: ~50 h), estimated as 6*N*D FLOPs at 40% MFU, not measured.
# Prepare the data first: python -m data.openwebtext.prepare
include("_gpt2_540m.py")
include("_optimizer_adamw.py")
out_dir = "out-gpt2-540m-adamw"
wandb_run_name = "gpt2-540m-adamw"
learning_rate = 3.0e-4
min_lr = 1.5e-5
