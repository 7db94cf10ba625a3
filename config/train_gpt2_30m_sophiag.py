# Sophia paper (Liu et al. 2023), Table 2 / Fig. 1 & 4: 30M GPT-2 on OpenWebText with Sophia-G,
# 100K steps x 480 sequences x 1024 tokens (49B tokens), warmup 2K, cosine to 0.05x peak, clip 1.0, bf16.
# Cost: about 24 A100-hours (8 x A100: ~3 h), estimated as 6*N*D FLOPs at 40% MFU, not measured.
# Prepare the data first: python -m data.openwebtext.prepare
include("_gpt2_30m.py")
include("_optimizer_sophiag.py")
out_dir = "out-gpt2-30m-sophiag"
wandb_run_name = "gpt2-30m-sophiag"
learning_rate = 1.0e-3
min_lr = 5.0e-5
