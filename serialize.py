"""The text both agents read: one serialized dialogue, built segment by segment so that every token
position is known exactly (no re-tokenization drift between rollout and scoring). Imports no project
module: a fork that changes the format changes this file alone.

    <|bos|>  C: Hi.<|eot|>  <|strategy:greet|> (greet the customer)\nA: Hello and welcome!<|eot|>
    C: Hi, I want a laptop.<|eot|>  <|strategy:elicit_need|> (...)\nA: What matters most...<|eot|> ...

  - the Expert's decision at agent turn t is the strategy token: its log-prob comes from the
    logits one position earlier, restricted to the strategy tokens and masked to the SOP set
    (expert.py);
  - the CS Agent's reply is the span after "\nA:" up to and including <|eot|> (agent.py);
  - a flat agent (experiments/flat.py) reads the same text without strategy tokens or instructions.

With a pretrained tokenizer that has a chat template, the customer turns and the hand-over to the
agent take the template's role markers (`chat_parts`), so an instruct model reads its own format.
"""
import functools

BOS, EOT, PAD = "<|bos|>", "<|eot|>", "<|pad|>"


def strategy_token(z):
    return f"<|strategy:{z}|>"


def end_of_turn(tok):
    """The token that ends a turn in the tokenizer's chat template (the first special token after a
    user message), or its end-of-sequence token without a template. They differ for base models:
    Qwen2.5's eos is <|endoftext|>, its template ends turns with <|im_end|>."""
    if not getattr(tok, "chat_template", None):
        return tok.eos_token
    text = tok.apply_chat_template([{"role": "user", "content": "XXX"}, {"role": "assistant", "content": "YYY"}],
                                   tokenize=False)
    after_user = text.split("XXX", 1)[1].split("YYY", 1)[0]
    specials = set(tok.all_special_tokens) | set(tok.get_added_vocab())
    found = [(after_user.find(t), t) for t in specials if t and t in after_user]
    return min(found)[1] if found else tok.eos_token


@functools.lru_cache(maxsize=1 << 16)
def _encode(tok, vocab_size, text):
    """Memoised tok.encode (a dialogue repeats its templates and instructions constantly);
    vocab_size is in the key so that adding tokens to a tokenizer never returns a stale encoding."""
    return tuple(tok.encode(text, add_special_tokens=False))


def encode(tok, text):
    return list(_encode(tok, len(tok), text))


@functools.lru_cache(maxsize=None)
def chat_parts(tok):
    """(opening, user_open, assistant_open): the role markers of the tokenizer's chat template, or
    (None, "", "") without one. Found by rendering a user/assistant exchange and cutting it at the
    contents and at the end-of-turn token, e.g. for ChatML (SmolLM2):
      opening "<|im_start|>system\n...<|im_end|>", user_open "\n<|im_start|>user\n",
      assistant_open "\n<|im_start|>assistant\n"."""
    if not getattr(tok, "chat_template", None):
        return None, "", ""
    text = tok.apply_chat_template([{"role": "user", "content": "XXX"}, {"role": "assistant", "content": "YYY"},
                                    {"role": "user", "content": "ZZZ"}], tokenize=False)
    pre, rest = text.split("XXX", 1)
    mid, rest = rest.split("YYY", 1)
    post = rest.split("ZZZ", 1)[0]
    eos = tok.eos_token
    user_open, assistant_open = post.split(eos)[-1], mid.split(eos)[-1]
    for head in (user_open, user_open.lstrip()):   # what opens the dialogue before the first user turn
        if pre.endswith(head):
            return pre[:len(pre) - len(head)], user_open, assistant_open
    return pre, user_open, assistant_open


def start_ids(tok):
    """The tokens that open every dialogue: the chat template's opening (system prompt), or BOS."""
    opening = chat_parts(tok)[0]
    return encode(tok, opening) if opening else [tok.bos_token_id]


def customer_ids(tok, text):
    """A customer turn, then the marker that hands the word to the agent (chat templates only)."""
    _, user_open, assistant_open = chat_parts(tok)
    return encode(tok, user_open + "C: " + text) + [tok.eos_token_id] + \
        (encode(tok, assistant_open) if assistant_open else [])


def agent_prompt_ids(tok, z, instruction):
    """Strategy token, then the one-line instruction the CS Agent follows."""
    return [tok.convert_tokens_to_ids(strategy_token(z))] + encode(tok, f" ({instruction})\nA:")


def flat_prompt_ids(tok):
    """The prompt of a flat agent (the PPO baseline and the no-Expert ablation): no strategy, no
    instruction, only the hand-over to the reply."""
    return encode(tok, "\nA:")


def reply_ids(tok, text):
    return encode(tok, " " + text) + [tok.eos_token_id]


def encode_dialogue(tok, turns, instructions):
    """Serialize a record's turns; instructions=None serializes them for a flat agent (no strategy
    token before a reply, so no decisions).

    Returns ids (list[int]), decisions [(position of the strategy token, strategy)], and
    replies [(start, end)] half-open spans of each agent reply (its <|eot|> included).
    """
    ids, decisions, replies = start_ids(tok), [], []
    for turn in turns:
        if turn["role"] == "customer":
            ids += customer_ids(tok, turn["text"])
        else:
            if instructions is None:
                ids += flat_prompt_ids(tok)
            else:
                decisions.append((len(ids), turn["strategy"]))
                ids += agent_prompt_ids(tok, turn["strategy"], instructions[turn["strategy"]])
            start = len(ids)
            ids += reply_ids(tok, turn["text"])
            replies.append((start, len(ids)))
    return ids, decisions, replies
