# GPT-2 small (125M) with SOAP on FineWeb-Edu (sample-10BT) instead of OpenWebText: the Sophia paper's
# Table 2 recipe of train_gpt2_small_soap.py (100K steps x 480 x 1024 tokens = 49B, ~5 passes over the
# ~10B tokens, as over OpenWebText's 9B). Not in the paper; the LR is AdamW's OpenWebText one, untuned here.
# Cost: about 93 A100-hours (8 x A100: ~12 h), estimated as 6*N*D FLOPs at 40% MFU, not measured. SOAP's eigenbasis refreshes and rotations are not counted.
# Prepare the data first: python -m data.fineweb_edu.prepare
include("train_gpt2_small_soap.py")
dataset = "fineweb_edu"
out_dir = "out-gpt2-small-fineweb-edu-soap"
wandb_run_name = "gpt2-small-fineweb-edu-soap"
