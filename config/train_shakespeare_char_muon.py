# The CPU quick start's model and budget with Muon (hidden matrices) and AdamW (the rest).
# Cost: a few minutes on 2 CPU cores.
include("train_shakespeare_char.py")
include("_optimizer_muon.py")
out_dir = "out-shakespeare-char-muon"
learning_rate = 2e-3  # LR_SWEEP_PENDING
min_lr = 2e-4
beta2 = 0.99  # nanoGPT's value for this small batch, as for AdamW here
