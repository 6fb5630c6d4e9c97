"""Shared language-model helpers: tokenizer and tiny model, dialogue serialization, log-probs, sampling.

Both agents read the same serialized dialogue, built segment by segment so token positions are
known exactly (no re-tokenization drift between rollout and scoring):

    <|bos|>  C: Hi.<|eot|>  <|strategy:greet|> (greet the customer)\nA: Hello and welcome!<|eot|>
    C: Hi, I want a laptop.<|eot|>  <|strategy:elicit_need|> (...)\nA: What matters most...<|eot|> ...

  - the Expert's decision at agent turn t is the strategy token: its log-prob comes from the
    logits one position earlier, restricted to the strategy tokens and masked to the SOP set;
  - the CS Agent's reply is the span after "\nA:" up to and including <|eot|>.
"""
import os
import shutil

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

BOS, EOT, PAD = "<|bos|>", "<|eot|>", "<|pad|>"


def strategy_token(z):
    return f"<|strategy:{z}|>"


# ----------------------------------------------------------------------------- tokenizer and model
def train_tokenizer(texts, strategies, vocab_size=1024):
    """Byte-level BPE trained on the run's own text, with one special token per strategy."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, EOT] + [strategy_token(z) for z in strategies]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT,
                                   pad_token=PAD, padding_side="left")


def build_tiny_model(tokenizer, d_model=128, n_layer=4, n_head=4, max_len=1024, seed=0):
    """A Llama-architecture causal LM built from config (about 1M parameters at the defaults)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=3 * d_model,
                         num_hidden_layers=n_layer, num_attention_heads=n_head,
                         num_key_value_heads=n_head, max_position_embeddings=max_len,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return AutoModelForCausalLM.from_config(config)


def add_strategy_tokens(model, tokenizer, strategies):
    """Make sure every strategy has its own token; new rows start at the mean embedding of its name.

    For a tokenizer trained with the strategy tokens (the tiny model) only the initialisation runs.
    """
    tokens = [strategy_token(z) for z in strategies]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for z, t in zip(strategies, tokens):
            name_ids = tokenizer.encode(" " + z.replace("_", " "), add_special_tokens=False)
            emb[tokenizer.convert_tokens_to_ids(t)] = emb[name_ids].mean(0)
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def save(model, tokenizer, path):
    """A folder that `AutoModelForCausalLM/AutoTokenizer.from_pretrained(path)` loads, written atomically."""
    atomic_dir(path, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))


def atomic_dir(path, write):
    """Write a folder so that a crash at any moment leaves either the old folder or the new one.

    `write(tmp)` fills a temporary folder; then the old folder moves aside, the new one takes its
    name and the old one is deleted. A crash between the two renames leaves `path.old`, which
    `recover` puts back.
    """
    tmp, old = path + ".tmp", path + ".old"
    recover(path)
    os.makedirs(tmp)
    write(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def recover(path):
    """Undo a save that died between its two renames; drop half-written temporaries."""
    shutil.rmtree(path + ".tmp", ignore_errors=True)
    if not os.path.exists(path) and os.path.exists(path + ".old"):
        os.replace(path + ".old", path)
    shutil.rmtree(path + ".old", ignore_errors=True)


def sft_loop(model, step_loss, steps, lr, cycle, desc):
    """The SFT loop both agents share: AdamW, `sft_schedule`, guarded steps, a progress bar.

    step_loss(step) -> scalar loss tensor of that step's batch. Returns the list of losses.
    """
    from tqdm import tqdm
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: sft_schedule(s, cycle))
    model.train()
    losses = []
    for step in (bar := tqdm(range(steps), desc=desc, leave=False)):
        loss = step_loss(step)
        if not guarded_step(model, opt, loss):
            bar.write(f"{desc}: non-finite loss or gradient at step {step}, step skipped")
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def guarded_step(model, opt, loss, max_norm=1.0):
    """backward + clip + step, unless the loss or the gradient is not finite (then skip, return False)."""
    opt.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return False
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        return False
    opt.step()
    return True


def load(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    return model, tokenizer


def sft_schedule(step, cycle):
    """LR multiplier for SFT: 20-step warmup, then linear decay to 0, restarting every `cycle` steps.

    Why restarts: on the tiny models, the copy skill the CS Agent needs (repeat the customer's
    must-have, name the product that has it) appeared reliably after two 100-step cycles and not
    after one 200-step decay (measured in the README's notes).
    """
    s = step % cycle
    return min(1.0, (s + 1) / 20) * (1 - s / cycle)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- serialization
def customer_ids(tok, text):
    return tok.encode("C: " + text, add_special_tokens=False) + [tok.eos_token_id]


def agent_prompt_ids(tok, z, instruction):
    """Strategy token, then the one-line instruction the CS Agent follows."""
    return [tok.convert_tokens_to_ids(strategy_token(z))] + \
        tok.encode(f" ({instruction})\nA:", add_special_tokens=False)


def reply_ids(tok, text):
    return tok.encode(" " + text, add_special_tokens=False) + [tok.eos_token_id]


def encode_dialogue(tok, turns, instructions):
    """Serialize a record's turns.

    Returns ids (list[int]), decisions [(position of the strategy token, strategy)], and
    replies [(start, end)] half-open spans of each agent reply (its <|eot|> included).
    """
    ids, decisions, replies = [tok.bos_token_id], [], []
    for turn in turns:
        if turn["role"] == "customer":
            ids += customer_ids(tok, turn["text"])
        else:
            decisions.append((len(ids), turn["strategy"]))
            ids += agent_prompt_ids(tok, turn["strategy"], instructions[turn["strategy"]])
            start = len(ids)
            ids += reply_ids(tok, turn["text"])
            replies.append((start, len(ids)))
    return ids, decisions, replies


# ----------------------------------------------------------------------------- batching and log-probs
def pad(seqs, pad_id, left=False):
    """list of id lists -> ids (B, L) long, attention mask (B, L) long."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(L - len(s), L) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        attn[i, sl] = 1
    return ids, attn


def forward_logits(model, ids, attn):
    """Logits (B, L, V) for a padded batch; left padding is handled with explicit positions."""
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=attn, position_ids=pos).logits


def token_logps(logits, ids):
    """log p(ids[:, i] | ids[:, :i]) for i >= 1: (B, L-1)."""
    return torch.gather(F.log_softmax(logits[:, :-1].float(), -1), 2, ids[:, 1:, None]).squeeze(2)


@torch.no_grad()
def generate(model, prompts, pad_id, stop_id, max_new_tokens=32, temperature=1.0, generator=None):
    """Batched sampling with a KV cache; greedy when temperature == 0.

    prompts: list of B id lists (left-padded here). Returns B lists of new ids, each ending at
    `stop_id` (or cut at max_new_tokens).
    """
    ids, attn = pad(prompts, pad_id, left=True)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
    B = len(prompts)
    done = torch.zeros(B, dtype=torch.bool)
    new = []
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # (B, V)
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = F.softmax(logits / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        new.append(nxt)
        done |= nxt == stop_id
        if done.all():
            break
        attn = torch.cat([attn, (~done).long()[:, None] | 1], 1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos,
                    cache=out.cache, use_cache=True)
    new = torch.stack(new, 1).tolist()  # (B, T)
    result = []
    for row in new:
        cut = row.index(stop_id) + 1 if stop_id in row else len(row)
        result.append(row[:cut])
    return result
