"""The Customer Service Agent: pi_C(y_t | h_t, z_t), a causal LM that writes the reply.

Its prompt is the dialogue so far, then the chosen strategy token and that strategy's one-line
instruction, then "A:" (see lm.py for the format). It never chooses the strategy; it carries out
the one the Expert chose. SFT uses the logged replies with loss on reply tokens only; one forward
covers every reply of a dialogue.
"""
import random


import lm
import parallel
import serialize


def reply_mask(n_tokens, replies):
    """1 on the positions of reply tokens (targets), 0 elsewhere: list of length n_tokens."""
    mask = [0] * n_tokens
    for start, end in replies:
        mask[start:end] = [1] * (end - start)
    return mask


def reply_logps(model, ids, attn, target_mask):
    """Summed log-prob of the masked target tokens per row: ids/attn/target_mask (B, L) -> (B,).
    The output layer runs only on the target positions, in chunks (lm.target_logps)."""
    return lm.target_logps(model, ids, attn, target_mask).sum(-1)


def collate(examples, pad_id):
    """examples: list of (ids, target mask) -> ids, attn, target_mask, all (B, L), right-padded."""
    ids, attn = lm.pad([e[0] for e in examples], pad_id)
    mask, _ = lm.pad([e[1] for e in examples], 0)
    return ids, attn, mask.float()


def sft_examples(tok, records, instructions):
    """(whole dialogues, windows): lists of (token ids, reply-target mask), the two kinds of SFT example."""
    dialogues, windows = [], []
    opening = serialize.start_ids(tok)
    for r in records:
        ids, decisions, replies = serialize.encode_dialogue(tok, r["turns"], instructions)
        dialogues.append((ids, reply_mask(len(ids), replies)))
        starts = [len(opening)] + [end for _, end in replies[:-1]]   # each window opens at a customer turn
        for s, (a, b) in zip(starts, replies):
            w = opening + ids[s:b]
            windows.append((w, [0] * (len(opening) + a - s) + [1] * (b - a)))
    return dialogues, windows


def sft(model, tok, records, instructions, steps, batch_size=16, lr=3e-3, seed=0, cycle=100,
        window_steps=0, desc="SFT agent", micro=None):
    """Supervised fine-tuning on logged replies: minimise the mean NLL of reply tokens.

    The first `window_steps` steps are a curriculum on short windows (the customer's last turn,
    the strategy prompt, the reply; 4x the batch size of them), the rest on whole dialogues.
    Why: a from-scratch model learns to copy the customer's must-have into the reply far faster
    when there are 30 tokens to search instead of 200; the skill then carries to whole dialogues.
    micro: --device-batch-size, at most this many sequences per forward (lm.micro_batches).
    """
    dialogues, windows = sft_examples(tok, records, instructions)
    rng = random.Random(seed)

    def step_loss(step):
        pool, n = (windows, 4 * batch_size) if step < window_steps else (dialogues, batch_size)
        sample = rng.sample(pool, min(n, len(pool)))                           # the same on every rank
        mine, weight = parallel.share_or_dummy(sample)
        n_tokens = sum(sum(m) for _, m in sample)
        if micro:   # one loss per micro-batch, each backpropagated before the next forward
            return (-weight * w * reply_logps(model, *collate(run, tok.pad_token_id)).sum() / parallel.denominator(n_tokens)
                    for run, w in lm.micro_batches(mine, micro, len(sample), length=lambda e: len(e[0])))
        logp = sum(reply_logps(model, *collate(group, tok.pad_token_id)).sum()
                   for group in lm.length_buckets(mine, n_total=len(sample), length=lambda e: len(e[0])))
        return -weight * logp / parallel.denominator(n_tokens)   # mean NLL per token
    return lm.sft_loop(model, step_loss, steps, lr, cycle, desc)
