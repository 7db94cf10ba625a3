# CPU quick start: a 0.8M-parameter character-level GPT (4 layers x 128, block 64) trained with
# Sophia-G on the embedded Shakespeare corpus, nanoGPT's CPU recipe (batch 12, 2000 steps).
# Cost: a few minutes on 2 CPU cores (see README, "Quick start", for the measured time and loss).
out_dir = "out-shakespeare-char"
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False
dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
max_iters = 2000
lr_decay_iters = 2000
warmup_iters = 100
compile = False  # compiling takes longer than it saves on a run this short
optimizer_name = "sophiag"
learning_rate = 5e-4  # best of the sweep 1.25e-4, 2.5e-4, 5e-4, 1e-3 (docs/RESULTS.md)
min_lr = 5e-5
weight_decay = 0.2
beta1 = 0.96  # the paper's (App. C); docs/RESULTS.md's runs used the reference code's 0.965
beta2 = 0.99
rho = 0.05
hess_interval = 10
hess_batch_size = 6  # half of the batch, as in the paper
