"""LoRA through peft (train.py --lora-r): adapters and the strategy tokens' rows on a pretrained
backbone, the frozen SFT adapter read beside the trained one (--ref sft, kl_to_sft), and adapter
folders loaded over their base. peft is imported only on these paths: without --lora-r nothing here
runs. Stands on serialize.py alone; lm.py calls it (new_models, place, reference, load).
"""
import json
import os

import torch
from transformers import AutoModelForCausalLM

import serialize


def names(args):
    """The models that get LoRA adapters: both agents, or the one --lora-only names ([] without --lora-r)."""
    if not getattr(args, "lora_r", None):
        return []
    return [args.lora_only] if args.lora_only else ["expert", "agent"]


def add(model, tok, strategies, args):
    """A pretrained backbone -> a peft model whose only trainable parameters are LoRA adapters
    (--lora-r, --lora-alpha, --lora-dropout on --lora-targets) and the strategy tokens' rows, through
    peft's `trainable_token_indices`: the input embedding's rows, and the output layer's where it is
    not tied to them (the Expert reads those rows). The base is frozen; adapters and rows are fp32."""
    from peft import LoraConfig, get_peft_model
    ids = [tok.convert_tokens_to_ids(serialize.strategy_token(z)) for z in strategies]
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    short = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules()}   # module -> its last name
    tokens = ids if head is None or head.weight is emb.weight else {short[emb]: ids, short[head]: ids}
    targets = "all-linear" if args.lora_targets == "all-linear" else args.lora_targets.split(",")
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r, lora_dropout=args.lora_dropout,
                        target_modules=targets, trainable_token_indices=tokens, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def linear_names(name):
    """The names (last component) of a backbone's linear layers, from its config alone (meta device):
    what --lora-targets may name."""
    from transformers import AutoConfig
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name))
    head = model.get_output_embeddings()
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


def is_peft(model):
    return hasattr(model, "peft_config")


class AdapterView:
    """A peft model read with another of its adapters active (`reference_adapter`): its calls run with
    that adapter, and every other attribute is the model's."""

    def __init__(self, model, adapter):
        self.model, self.adapter = model, adapter

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        active = self.model.active_adapter
        self.model.base_model.set_adapter(self.adapter, inference_mode=True)
        try:
            return self.model(*args, **kwargs)
        finally:
            self.model.base_model.set_adapter(active)


def reference_adapter(model, folder, device):
    """The SFT adapter in `folder` loaded beside the trained one and switched on for its forwards (as
    TRL's ref_adapter_name): lm.reference's frozen SFT model without a second copy of the base."""
    model.load_adapter(folder, adapter_name="sft", is_trainable=False)
    model.to(device)
    model.base_model.set_adapter("default")
    return AdapterView(model, "sft")


def is_adapter_folder(path):
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def load(path, n_tokens):
    """The peft model of an adapter folder (adapters and strategy-token rows) over the base it names,
    loaded again in fp32 (lm.place casts a frozen base to bf16 with --bf16); n_tokens: its tokenizer's
    length, which the base's embedding grows to (the strategy tokens' rows are the adapter's)."""
    from peft import PeftModel
    with open(os.path.join(path, "adapter_config.json")) as f:
        base = AutoModelForCausalLM.from_pretrained(json.load(f)["base_model_name_or_path"], dtype=torch.float32)
    if base.get_input_embeddings().weight.shape[0] < n_tokens:
        base.resize_token_embeddings(n_tokens, mean_resizing=False)
    return PeftModel.from_pretrained(base, path, is_trainable=True)
