# Sophia paper (Liu et al. 2023), Table 2 / Fig. 1 & 4: GPT-2 small (125M) on OpenWebText with Lion,
# 100K steps x 480 sequences x 1024 tokens (49B tokens), warmup 2K, cosine to 0.05x peak, clip 1.0, bf16.
# Cost: about 93 A100-hours (8 x A100: ~12 h), estimated as 6*N*D FLOPs at 40% MFU, not measured.
# Prepare the data first: python data/openwebtext/prepare.py
out_dir = "out-gpt2-small-lion"
wandb_run_name = "gpt2-small-lion"
dataset = "openwebtext"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
batch_size = 12  # per GPU; x gradient_accumulation_steps = 480 sequences per step
gradient_accumulation_steps = 40  # over all GPUs: a multiple of 8
optimizer_name = "lion"
learning_rate = 1.5e-4
min_lr = 7.5e-6
weight_decay = 0.2
beta1 = 0.95
beta2 = 0.98
max_iters = 100000
lr_decay_iters = 100000
warmup_iters = 2000
eval_interval = 1000
eval_iters = 200
log_interval = 10
grad_clip = 1.0
