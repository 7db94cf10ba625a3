# Sophia paper (Liu et al. 2023), Table 2 / Fig. 1 & 4: GPT-2 medium (355M) on OpenWebText with Sophia-H,
# 100K steps x 480 sequences x 1024 tokens (49B tokens), warmup 2K, cosine to 0.05x peak, clip 1.0, bf16.
# Cost: about 270 A100-hours (8 x A100: ~34 h), estimated as 6*N*D FLOPs at 40% MFU, not measured.
# Prepare the data first: python data/openwebtext/prepare.py
out_dir = "out-gpt2-medium-sophiah"
wandb_run_name = "gpt2-medium-sophiah"
dataset = "openwebtext"
n_layer = 24
n_head = 16
n_embd = 1024
block_size = 1024
batch_size = 6  # per GPU; x gradient_accumulation_steps = 480 sequences per step
gradient_accumulation_steps = 80  # over all GPUs: a multiple of 8
optimizer_name = "sophiah"
learning_rate = 4.0e-4
min_lr = 2.0e-5
weight_decay = 0.2
beta1 = 0.96
beta2 = 0.99
rho = 0.01
hess_interval = 10
hess_batch_size = 32  # paper Sec. 3.4; a multiple of the GPU count
max_iters = 100000
lr_decay_iters = 100000
warmup_iters = 2000
eval_interval = 1000
eval_iters = 200
log_interval = 10
grad_clip = 1.0
