# GPT-2 small (125M) with Muon on FineWeb-Edu (sample-10BT) instead of OpenWebText: the Sophia paper's
# Table 2 recipe of train_gpt2_small_muon.py (100K steps x 480 x 1024 tokens = 49B, ~5 passes over the
# ~10B tokens, as over OpenWebText's 9B). Not in the paper; the LR is AdamW's OpenWebText one, untuned here.
# Cost: about 93 A100-hours (8 x A100: ~12 h), estimated as 6*N*D FLOPs at 40% MFU, not measured. Muon's Newton-Schulz steps add a few percent.
# Prepare the data first: python -m data.fineweb_edu.prepare
include("train_gpt2_small_muon.py")
dataset = "fineweb_edu"
out_dir = "out-gpt2-small-fineweb-edu-muon"
wandb_run_name = "gpt2-small-fineweb-edu-muon"
