# Sophia paper (Liu et al. 2023), Table 2 / Fig. 1 & 4: GPT-2 small (125M) on OpenWebText with SOAP,
# 100K steps x 480 sequences x 1024 tokens (49B tokens), warmup 2K, cosine to 0.05x peak, clip 1.0, bf16.
# Cost: about 93 A100-hours (8 x A100: ~12 h), estimated as 6*N*D FLOPs at 40% MFU, not measured. SOAP's eigenbasis refreshes (a QR per matrix side every 10 steps) and rotations are not counted.
# Prepare the data first: python -m data.openwebtext.prepare
# Not in the paper (Table 2 has no SOAP): AdamW's LR (SOAP is Adam in a rotated basis); untuned.
include("_gpt2_small.py")
include("_optimizer_soap.py")
out_dir = "out-gpt2-small-soap"
wandb_run_name = "gpt2-small-soap"
learning_rate = 6.0e-4
min_lr = 3.0e-5
