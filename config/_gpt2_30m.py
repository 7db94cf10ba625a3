# The paper's 30M GPT-2 on its GPT-2 setup: model shape and how the 480-sequence batch is split.
# Cost: none by itself; included by config/train_gpt2_30m_*.py, which states its cost.
include("_gpt2_paper.py")
n_layer, n_head, n_embd = 6, 6, 384  # blocks, heads per block, width
batch_size = 30  # per GPU; x gradient_accumulation_steps = 480 sequences per step
gradient_accumulation_steps = 16  # over all GPUs: a multiple of 8
