# GPT-2 small (125M) on the paper's GPT-2 setup: model shape and how the 480-sequence batch is split.
# Cost: none by itself; included by config/train_gpt2_small_*.py, which states its cost.
include("_gpt2_paper.py")
n_layer, n_head, n_embd = 12, 12, 768  # blocks, heads per block, width
batch_size = 12  # per GPU; x gradient_accumulation_steps = 480 sequences per step
gradient_accumulation_steps = 40  # over all GPUs: a multiple of 8
