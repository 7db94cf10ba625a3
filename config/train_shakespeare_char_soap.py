# The CPU quick start's model and budget with SOAP (Adam in Shampoo's eigenbasis, pytorch-optimizer).
# Cost: a few minutes on 2 CPU cores (each step also rotates every matrix's gradient and moments).
include("train_shakespeare_char.py")
include("_optimizer_soap.py")
out_dir = "out-shakespeare-char-soap"
learning_rate = 4e-3  # AdamW's best here, untuned for SOAP (docs/RESULTS.md tunes it at the long horizon)
min_lr = 4e-4
beta2 = 0.99  # nanoGPT's value for this small batch, as for AdamW here
