"""Generate text from a trained checkpoint or from OpenAI's GPT-2 weights.

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3
    python sample.py --init_from=gpt2 --start=FILE:prompt.txt --max_new_tokens=100
The tokenizer is the one of the dataset the checkpoint was trained on (character level or
GPT-2 BPE); GPT-2 weights use GPT-2's BPE. Keys as in train.py: --help lists them.
"""

import sys
from pathlib import Path

import torch

import configurator
from checkpoint import load_model
from devices import placement
from errors import UserError, exit_on_user_error

init_from = "resume"  # 'resume' (the checkpoint in out_dir) or 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'
out_dir = "out-shakespeare-char"  # the training run to sample from
start = "\n"  # the prompt; "FILE:path.txt" reads it from a file
num_samples = 3  # how many samples
max_new_tokens = 500  # tokens generated per sample
temperature = 0.8  # < 1 sharpens, > 1 flattens the distribution; 0 is greedy
top_k = 200  # keep only the k most likely tokens (0 keeps all)
seed = 1337  # the sampling seed
device = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'
dtype = "auto"  # 'auto' (bfloat16 on GPUs that have it, float16 on older GPUs, float32 on CPU), or explicit
DEFAULTS = {k: globals()[k] for k in configurator.config_keys(dict(globals()))}


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[str]:
    """Print and return the samples."""
    cfg = configurator.parse(DEFAULTS, sys.argv[1:] if argv is None else argv, help_source=__file__)
    for key, low in (("num_samples", 1), ("max_new_tokens", 1), ("temperature", 0), ("top_k", 0)):
        if cfg[key] < low:
            raise UserError(f"{key}={cfg[key]} must be at least {low}; see --help")
    dev, mixed = placement(cfg["device"], cfg["dtype"])
    model, encode, decode = load_model(cfg)
    model.eval().to(dev)

    prompt = cfg["start"]
    if prompt.startswith("FILE:"):
        file = Path(prompt[5:])
        try:
            prompt = file.read_bytes().decode("utf-8")
        except OSError as e:
            raise UserError(f"prompt file {file} is not a readable file ({e.strerror}); give an existing file after "
                            f"FILE:") from None
        except UnicodeDecodeError as e:
            raise UserError(f"prompt file {file} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                            f"{e.start}); give a text file after FILE:") from None
    try:
        ids = encode(prompt)
    except ValueError as e:
        raise UserError(f"the prompt cannot be encoded: {e}; change --start") from e
    if not ids:
        raise UserError("the prompt is empty; give at least one character with --start")
    x = torch.tensor(ids, dtype=torch.long, device=dev)[None, ...]
    generator = torch.Generator(device=dev).manual_seed(cfg["seed"])
    samples = []
    with torch.no_grad(), mixed:
        for _ in range(cfg["num_samples"]):
            y = model.generate(x, cfg["max_new_tokens"], temperature=cfg["temperature"],
                               top_k=cfg["top_k"] or None, generator=generator)
            samples.append(decode(y[0].tolist()))
            print(samples[-1])
            print("---------------")
    return samples


if __name__ == "__main__":
    main()
