# Sophia paper (Liu et al. 2023), Table 2 / Fig. 1 & 4: 540M GPT-2 on OpenWebText with Muon,
# 100K steps x 480 sequences x 1024 tokens (49B tokens), warmup 2K, cosine to 0.05x peak, clip 1.0, bf16.
# Cost: about 398 A100-hours (8 x A100: ~50 h), estimated as 6*N*D FLOPs at 40% MFU, not measured. Muon's Newton-Schulz steps add a few percent, not counted.
# Prepare the data first: python -m data.openwebtext.prepare
# Not in the paper (Table 2 has no Muon): AdamW's LR, which Muon's RMS-matched LR scaling is meant to reuse; untuned.
include("_gpt2_540m.py")
include("_optimizer_muon.py")
out_dir = "out-gpt2-540m-muon"
wandb_run_name = "gpt2-540m-muon"
learning_rate = 3.0e-4
min_lr = 1.5e-5
