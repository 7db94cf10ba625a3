# Sophia paper (Liu et al. 2023), Table 2 / Fig. 1 & 4: GPT-2 small (125M) on OpenWebText with Lion,
# 100K steps x 480 sequences x 1024 tokens (49B tokens), warmup 2K, cosine to 0.05x peak, clip 1.0, bf16.
# Cost: about 93 A100-hours (8 x A100: ~12 h), estimated as 6*N*D FLOPs at 40% MFU, not measured.
# Prepare the data first: python data/openwebtext/prepare.py
include("_gpt2_paper.py")
include("_optimizer_lion.py")
out_dir = "out-gpt2-small-lion"
wandb_run_name = "gpt2-small-lion"
n_layer = 12
n_head = 12
n_embd = 768
batch_size = 12  # per GPU; x gradient_accumulation_steps = 480 sequences per step
gradient_accumulation_steps = 40  # over all GPUs: a multiple of 8
learning_rate = 1.5e-4
min_lr = 7.5e-6
