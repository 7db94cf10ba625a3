# The CPU quick start's model and budget with AdamW (nanoGPT's Shakespeare settings).
# Cost: a few minutes on 2 CPU cores.
include("train_shakespeare_char.py")
out_dir = "out-shakespeare-char-adamw"
optimizer_name = "adamw"
learning_rate = 2e-3
min_lr = 2e-4
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
