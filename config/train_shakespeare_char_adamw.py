# The CPU quick start's model and budget with AdamW (nanoGPT's Shakespeare settings).
# Cost: a few minutes on 2 CPU cores.
include("train_shakespeare_char.py")
include("_optimizer_adamw.py")
out_dir = "out-shakespeare-char-adamw"
learning_rate = 4e-3  # best of the sweep 1e-3, 2e-3, 4e-3, 8e-3 (docs/RESULTS.md)
min_lr = 4e-4
beta2 = 0.99  # nanoGPT's value for this small batch, instead of the paper's 0.95
