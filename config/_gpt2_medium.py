# GPT-2 medium (355M) on the paper's GPT-2 setup: model shape and how the 480-sequence batch is split.
# Cost: none by itself; included by config/train_gpt2_medium_*.py, which states its cost.
include("_gpt2_paper.py")
n_layer, n_head, n_embd = 24, 16, 1024  # blocks, heads per block, width
batch_size = 6  # per GPU; x gradient_accumulation_steps = 480 sequences per step
gradient_accumulation_steps = 80  # over all GPUs: a multiple of 8
