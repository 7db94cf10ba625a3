# Sophia paper (Liu et al. 2023), Table 2 / Fig. 1 & 4: GPT-2 large (770M) on OpenWebText with Lion,
# 100K steps x 480 sequences x 1024 tokens (49B tokens), warmup 2K, cosine to 0.05x peak, clip 1.0, bf16.
# Cost: about 568 A100-hours (8 x A100: ~71 h), estimated as 6*N*D FLOPs at 40% MFU, not measured.
# Prepare the data first: python -m data.openwebtext.prepare
# The paper trains no Lion model at this size: lr = AdamW lr / 5 (Lion paper's rule of thumb), untuned.
include("_gpt2_large.py")
include("_optimizer_lion.py")
out_dir = "out-gpt2-large-lion"
wandb_run_name = "gpt2-large-lion"
learning_rate = 4.0e-5
min_lr = 2.0e-6
