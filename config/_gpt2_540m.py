# The paper's 540M GPT-2 on its GPT-2 setup: model shape and how the 480-sequence batch is split.
# Cost: none by itself; included by config/train_gpt2_540m_*.py, which states its cost.
include("_gpt2_paper.py")
n_layer, n_head, n_embd = 30, 18, 1152  # blocks, heads per block, width
batch_size = 4  # per GPU; x gradient_accumulation_steps = 480 sequences per step
gradient_accumulation_steps = 120  # over all GPUs: a multiple of 8
scale_attn_by_inverse_layer_idx = True  # paper App. C.2: AdamW/Lion need it above 355M; same for every optimizer
