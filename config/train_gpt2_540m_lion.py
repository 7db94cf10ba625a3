# Sophia paper (Liu et al. 2023), Table 2 / Fig. 1 & 4: 540M GPT-2 on OpenWebText with Lion,
# 100K steps x 480 sequences x 1024 tokens (49B tokens), warmup 2K, cosine to 0.05x peak, clip 1.0, bf16.
# Cost: about 398 A100-hours (8 x A100: ~50 h), estimated as 6*N*D FLOPs at 40% MFU, not measured.
# Prepare the data first: python data/openwebtext/prepare.py
# The paper trains no Lion model at this size: lr = AdamW lr / 5 (Lion paper's rule of thumb), untuned.
include("_gpt2_paper.py")
include("_optimizer_lion.py")
out_dir = "out-gpt2-540m-lion"
wandb_run_name = "gpt2-540m-lion"
n_layer = 30
n_head = 18
n_embd = 1152
batch_size = 4  # per GPU; x gradient_accumulation_steps = 480 sequences per step
gradient_accumulation_steps = 120  # over all GPUs: a multiple of 8
scale_attn_by_inverse_layer_idx = True  # paper App. C.2: AdamW/Lion need it above 355M; same for every optimizer
learning_rate = 6.0e-5
min_lr = 3.0e-6
