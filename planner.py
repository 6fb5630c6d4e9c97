"""Prompted planners: an instruct LM, trained on nothing, chooses the Expert's strategy from a prompt.

    python eval.py RUN --planner models/smollm2                  # in-process: the row prompted:smollm2
    python eval.py RUN --planner-url http://127.0.0.1:8000/v1 --planner-model NAME   # any OpenAI-style server

The row swaps the run's Expert for the prompted model and keeps the run's CS Agent, so it compares
planners (the paper's "GOPO-trained 14B against prompted Qwen-235B / GPT-5.2", in miniature).

The prompt is built from the world contract alone (worlds/__init__.py), so a fork's own world gets
one with no code change: a system message with the strategies and their one-line INSTRUCTIONS, the
SOP in words (world.SOP: a text, or the shop's previous-strategy table, written out) and N logged
training dialogues as examples (--planner-shots); then the dialogue as chat turns, rendered by the
model's own chat template (`apply_chat_template`): each decision is a user message (what the agent
said last, what the customer said, the strategies the SOP allows now) and the planner's answer, an
assistant message holding the strategy name alone.

The choice, in-process (`Planner`): the SOP-allowed strategy whose name, followed by the template's
end-of-turn token, has the highest log-probability as the assistant's answer. Normalisation: the SUM
of the token log-probs, i.e. the probability that the model's answer is exactly that name and nothing
more; not the mean per token. Why: the sum is the probability of the answer, the quantity greedy
decoding (and so the served path) approximates; the mean favours long names ("handle_objection",
5 tokens for SmolLM2) over short ones whose every token is likely, and has no such reading. The
end-of-turn token makes a name that is a prefix of another ("ask" / "ask_order") a complete answer
only where the model would stop there. The SOP holds by construction: forbidden names are never scored.

The KV cache (engine.Context): each dialogue's rendered prompt only grows (a turn appends the chosen
name, its end-of-turn and the next user message), so each turn encodes only its new tokens; the
candidates of a decision are one batched forward over the allowed names, reading a K-row view of that
dialogue's cache. The system message, the same in every dialogue, is encoded once per batch
(engine.Context.shared). A chat template that rewrites earlier turns (e.g. one that drops past reasoning)
breaks the growing prefix: refused with a one-line error (use --planner-url for such a model).

Served (`ServedPlanner`, --planner-url): the same messages go to a chat-completions endpoint
(temperature 0, a few tokens), concurrently for the dialogues of a batch, with a timeout and a bounded
retry (the `openai` client's). The answer is parsed (`parse`); an answer that names no strategy, or a forbidden one, is
counted invalid and the FALLBACK is played: the first strategy the SOP allows now, in world.allowed's
order (deterministic, no model in it; the invalid rate says how often it played). The client is the
`openai` package, imported on this path only (as worlds/hf.py imports `datasets`); not huggingface_hub's
InferenceClient, which refuses every URL, 127.0.0.1 included, under HF_HUB_OFFLINE=1 (our default).
"""
import concurrent.futures
import os
import re

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

import cli
import engine
import lm
import rollout as rollout_lib
import serialize

BATCH = 8    # dialogues in lockstep per prompted row: SmolLM2-135M's KV cache is 46 KB a token, ~2k tokens a dialogue
ANSWER_TOKENS = 12   # served path: enough for the longest strategy name and some slack


# ----------------------------------------------------------------------------- the prompt
def sop_words(world):
    """The SOP for a reader: world.SOP when it is text; the shop's table (previous -> allowed) written out."""
    if isinstance(world.SOP, str):
        return world.SOP
    return "Allowed next, by the previous strategy:\n" + "\n".join(
        f"  after {prev}: {', '.join(nxt) if nxt else 'nothing (the dialogue ends)'}" for prev, nxt in world.SOP.items())


def system_prompt(world, shots=()):
    """The system message: the task, the strategies with their instructions, the SOP, the examples."""
    lines = ["You plan a customer-service agent's next move. Each turn, choose the one strategy the agent "
             "carries out next. Answer with the strategy name only, exactly as written below.",
             "", "Strategies:"]
    lines += [f"  {z}: {world.INSTRUCTIONS[z]}" for z in world.STRATEGIES]
    lines += ["", "Rules (SOP):", sop_words(world),
              "", "Each turn also lists the strategies allowed now; choose one of them."]
    for n, rec in enumerate(shots, 1):
        lines += ["", f"Example dialogue {n}:"]
        lines += [f"  [{t['strategy']}] Agent: {t['text']}" if t["role"] == "agent" else f"  Customer: {t['text']}"
                  for t in rec["turns"]]
    return "\n".join(lines)


def user_message(agent_text, customer_text, allowed):
    said = f"Agent: {agent_text}\n" if agent_text is not None else ""
    return f"{said}Customer: {customer_text}\nAllowed now: {', '.join(allowed)}"


def messages(world, turns, shots=()):
    """Chat messages for the decision after `turns` (a record's turns so far, ending with the customer's):
    system, then per earlier decision a user message and the strategy chosen, then this decision's user
    message. Every allowed list is world.allowed of the strategies before it."""
    out = [{"role": "system", "content": system_prompt(world, shots)}]
    history, said = [], None
    for t in turns:
        if t["role"] == "agent":
            out.append({"role": "assistant", "content": t["strategy"]})
            history.append(t["strategy"])
            said = t["text"]
        else:
            out.append({"role": "user", "content": user_message(said, t["text"], world.allowed(history))})
    return out


def render(tok, msgs):
    """The prompt text through the model's own chat template, ending with the assistant's opening."""
    return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


# ----------------------------------------------------------------------------- parsing an answer
def parse(text, strategies, allowed):
    """(strategy or None, valid): the first strategy the answer names (case, spaces and hyphens as
    underscores; the longest name wins where names overlap, "ask_order" over "ask"); valid if it is
    allowed now. None: it names none."""
    norm = re.sub(r"[\s\-]+", "_", text.strip().lower())
    found = [(m.start(), -len(z), z) for z in strategies
             for m in re.finditer(rf"(?<![a-z0-9]){re.escape(z)}(?![a-z0-9])", norm)]
    if not found:
        return None, False
    z = min(found)[2]
    return z, z in allowed


# ----------------------------------------------------------------------------- in-process
def load(folder):
    """(model, tokenizer) of a local instruct model folder (or a hub id with --no-offline), or a one-line
    error: no config.json, or no chat template (the prompt goes through it)."""
    if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "config.json")):
        cli.die(f"--planner {folder}: the folder holds no config.json (not a Hugging Face model folder)")
    try:
        model, tok = lm.load(folder)
    except (OSError, ValueError) as e:
        cli.die(f"--planner {folder}: cannot load a model ({str(e).splitlines()[0]})")
    if not getattr(tok, "chat_template", None):
        cli.die(f"--planner {folder}: the tokenizer has no chat template (an instruct model is needed)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token      # only ever under a zero attention mask
    return model.eval(), tok


class Planner:
    """An instruct LM scoring the allowed strategy names as its answer (module docstring)."""

    def __init__(self, model, tok, world, shots=()):
        self.model, self.tok, self.world, self.shots = model, tok, world, shots
        self.eot = serialize.end_of_turn(tok)
        eot_id = tok.convert_tokens_to_ids(self.eot)
        self.names = {z: tok.encode(z, add_special_tokens=False) + [eot_id] for z in world.STRATEGIES}

    @torch.no_grad()
    def scores(self, ctx, row, last_logits, allowed):
        """{strategy: sum of its answer's token log-probs} for the allowed strategies of one dialogue.

        ctx: the engine.Context whose row `row` holds the dialogue's prompt, already encoded (its cache);
        last_logits (V,): the next-token logits after it. The first token of every name is read off
        last_logits; the rest come from one forward of the K names (K, L - 1) on a K-row view of the
        row's cache (expanded, not copied: the forward's own cache copies it when it appends)."""
        cands = [self.names[z] for z in allowed]
        ids, mask = lm.pad(cands, self.tok.pad_token_id)                                # (K, L), right-padded
        logp = F.log_softmax(last_logits.float(), -1)[ids[:, 0].to(last_logits.device)].cpu()   # (K,)
        if ids.shape[1] > 1:
            K, dev = len(cands), self.model.device
            cache = Cache(layer_class_to_replicate=DynamicLayer)
            for i, layer in enumerate(ctx.cache.layers):
                cache.update(layer.keys[row:row + 1].expand(K, -1, -1, -1),
                             layer.values[row:row + 1].expand(K, -1, -1, -1), i)
            inputs = ids[:, :-1]                                                       # (K, L - 1)
            attn = torch.cat([ctx.attn[row:row + 1].expand(K, -1), mask[:, :-1]], 1)    # (K, S + L - 1)
            pos = int(ctx.pos[row]) + torch.arange(inputs.shape[1]).expand(K, -1)
            out = self.model(input_ids=inputs.to(dev), attention_mask=attn.to(dev), position_ids=pos.to(dev),
                             **{engine.cache_argument(self.model): cache}, use_cache=True)
            rest = torch.gather(F.log_softmax(out.logits.float(), -1), 2, ids[:, 1:, None].to(dev)).squeeze(2)
            logp = logp + (rest.cpu() * mask[:, 1:]).sum(1)
        return dict(zip(allowed, logp.tolist()))


class PromptedDialogues(rollout_lib.Dialogues):
    """rollout.py's loop with a prompted planner deciding: `planner` is a Planner (in-process) or a
    ServedPlanner. Each agent turn of a record gets "planner_answer" (the served answer's text, or the
    name chosen in-process) and "planner_valid" (False where that answer was invalid and the fallback
    played; always True in-process)."""

    def __init__(self, planner, agent, scenarios, world, seed=0, index=None):
        super().__init__(agent, scenarios, world, seed, index)
        self.planner = planner
        for tr in self.trajs:
            tr["strategies"] = []                       # chosen so far
        if isinstance(planner, Planner):   # the system message, the same for every dialogue, is encoded once
            system = planner.tok.apply_chat_template(messages(world, [], planner.shots), tokenize=False)
            self.ctx = engine.Context.shared(planner.model, serialize.encode(planner.tok, system), len(scenarios),
                                             planner.tok.pad_token_id)
            self.text = [system for _ in scenarios]     # the rendered prompt already in ctx, per dialogue

    def ask(self, t, live, greedy):
        world, trajs = self.world, self.trajs
        allowed = [world.allowed(trajs[i]["strategies"]) for i in live]
        msgs = [messages(world, trajs[i]["turns"], self.planner.shots) for i in live]
        if isinstance(self.planner, Planner):
            chosen = self.ask_in_process(live, msgs, allowed)
        else:
            chosen = self.planner.choose(msgs, allowed)
        asks = []
        for i, (z, valid, answer) in zip(live, chosen):
            trajs[i]["strategies"].append(z)
            asks.append({"strategy": z, "valid": valid, "answer": answer})
        self.agent_ctx.extend([serialize.agent_prompt_ids(self.tok_a, a["strategy"], world.INSTRUCTIONS[a["strategy"]])
                               for a in asks])
        return asks

    def ask_in_process(self, live, msgs, allowed):
        new = []
        for i, m in zip(live, msgs):
            text = render(self.planner.tok, m)
            if not text.startswith(self.text[i]):
                cli.die("--planner: the model's chat template rewrites earlier turns, so the prompt cannot grow "
                        "in the KV cache; serve the model and use --planner-url")
            new.append(serialize.encode(self.planner.tok, text[len(self.text[i]):]))
            self.text[i] = text
        self.ctx.extend(new)
        logits = self.ctx.logits()                                                     # (B, V)
        chosen = []
        for j, (i, ok) in enumerate(zip(live, allowed)):
            scores = self.planner.scores(self.ctx, j, logits[j], ok)
            z = max(ok, key=lambda s: scores[s])          # ties: the SOP's order (max keeps the first)
            chosen.append((z, True, z))
            self.text[i] += z + self.planner.eot
        self.ctx.extend([self.planner.names[z] for z, _, _ in chosen])   # encoded with the next turn's message
        return chosen

    def record_turn(self, tr, ask, text, utterance, done):
        tr["turns"][-2].update(planner_valid=ask["valid"], planner_answer=ask["answer"])
        return not done and bool(self.world.allowed(tr["strategies"]))

    def keep(self, rows):
        if isinstance(self.planner, Planner):
            self.ctx.keep(rows)
        super().keep(rows)


def play(planner, agent, scenarios, world, seed, max_reply_tokens=32, batch=100):
    """Greedy held-out dialogues with the planner deciding and `agent` (model, tokenizer) writing, BATCH
    dialogues at a time -> records. Dialogue j is numbered j % batch, as eval.method_records numbers it
    in its --batch chunks, so its customer rolls the same dice as in the run's own rows."""
    from tqdm import tqdm
    starts = tqdm(range(0, len(scenarios), BATCH), desc=f"planner, {len(scenarios)} customers in batches of {BATCH}",
                  leave=False, unit="batch")
    return [tr["record"] for n in starts
            for tr in PromptedDialogues(planner, agent, scenarios[n:n + BATCH], world, seed,
                                        [j % batch for j in range(n, min(n + BATCH, len(scenarios)))]).play(
                True, 0.7, max_reply_tokens)]


def invalid_rate(records):
    """Share of the planner's decisions that were invalid answers (the fallback played)."""
    flags = [t.get("planner_valid", True) for r in records for t in r["turns"] if t["role"] == "agent"]
    return sum(not f for f in flags) / max(1, len(flags))


# ----------------------------------------------------------------------------- served
class ServedPlanner:
    """The same prompt to an OpenAI-compatible chat-completions server (module docstring). The key
    comes from OPENAI_API_KEY when set."""

    def __init__(self, url, model, world, shots=(), timeout=60.0, retries=2, workers=8):
        try:
            import openai   # this path only: transformers[serving] brings it (requirements.txt)
        except ImportError:
            cli.die("--planner-url needs the openai package: pip install openai (or transformers[serving])")
        # the client retries a failed or timed-out request `retries` times, with exponential backoff
        self.client = openai.OpenAI(base_url=url.rstrip("/"), api_key=os.environ.get("OPENAI_API_KEY") or "none",
                                    timeout=timeout, max_retries=retries)
        self.url, self.model, self.world, self.shots, self.workers = url, model, world, shots, workers

    def answer(self, msgs, max_tokens=ANSWER_TOKENS):
        """The server's greedy answer text (temperature 0)."""
        out = self.client.chat.completions.create(model=self.model, messages=msgs, max_tokens=max_tokens,
                                                  temperature=0.0)
        return out.choices[0].message.content or ""

    def check(self):
        """One tiny request before anything runs: an unreachable server, or one that rejects the model
        name, is a one-line error (exit 2) while nothing has been written."""
        try:
            self.answer([{"role": "user", "content": "Say OK."}], max_tokens=1)
        except Exception as e:  # noqa: BLE001 - openai's connection, timeout and HTTP status errors
            cli.die(f"--planner-url {self.url} --planner-model {self.model}: the server did not answer "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'})")

    def choose(self, msgs, allowed):
        """[(strategy, valid, answer text)] per dialogue; the requests of a batch run concurrently."""
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            texts = list(pool.map(self.answer, msgs))
        out = []
        for text, ok in zip(texts, allowed):
            z, valid = parse(text, self.world.STRATEGIES, ok)
            out.append((z, True, text) if valid else (ok[0], False, text))   # FALLBACK: the first allowed
        return out
