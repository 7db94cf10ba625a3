# The CPU quick start's model and budget with Muon (hidden matrices) and AdamW (the rest).
# Cost: a few minutes on 2 CPU cores.
include("train_shakespeare_char.py")
include("_optimizer_muon.py")
out_dir = "out-shakespeare-char-muon"
learning_rate = 8e-3  # best of the sweep 2e-3, 4e-3, 8e-3, 1.6e-2 (docs/RESULTS.md)
min_lr = 8e-4
beta2 = 0.99  # nanoGPT's value for this small batch, as for AdamW here
