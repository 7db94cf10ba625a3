# The paper's GPT-2 setup (Sec. 3.1, App. C): OpenWebText, 1024-token blocks, batch 480,
# 100K steps, 2K warmup, cosine decay to 0.05x peak, gradient clipping at 1.0, bf16 (dtype auto).
# Cost: none by itself; included by config/_gpt2_<size>.py for every config/train_gpt2_*.py, which states its cost.
dataset = "openwebtext"
block_size = 1024
max_iters = 100000
lr_decay_iters = 100000
warmup_iters = 2000
eval_interval = 1000
eval_iters = 200
log_interval = 10
grad_clip = 1.0
