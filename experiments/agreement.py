"""Served against in-process: does a served planner answer what the same model answers in-process?

    python eval.py RUN --planner-url http://127.0.0.1:8000/v1 --planner-model models/smollm2   # the served row
    python -m experiments.agreement RUN --row served:models/smollm2 --planner models/smollm2

At every decision of the served row's dialogues (eval_<row>.jsonl; the same contexts for all three):
  served     the server's answer text (recorded in the turn), parsed by planner.parse;
  generated  in-process greedy decoding of the same prompt (engine.generate, up to planner.ANSWER_TOKENS
             tokens, to the template's end of turn): what the server should have said, token for token;
  scored     the in-process row's choice (planner.Planner: the allowed name with the highest summed log-prob).
Prints how often generated == served (text, stripped) and how often the served choice (valid answers
only) equals the scored one. The second can differ by design: greedy decoding picks one token at a time
over the whole vocabulary, scoring compares whole allowed names.
"""
import json
import os
import re

import checkpoint
import cli
import data
import engine
import planner
import serialize

p = cli.Parser(__doc__)
p.add_argument("run", help="the run folder eval.py wrote the served row into")
p.add_argument("--row", required=True, help="the served row, e.g. served:models/smollm2")
p.add_argument("--planner", required=True, metavar="MODEL", help="the same model's local folder")
p.add_argument("--planner-shots", type=cli.nonneg(int), default=0, metavar="N", help="as the served row was run")


def main(argv=None):
    args = p.parse_args(argv)
    run = checkpoint.check_folder(args.run)
    world = checkpoint.world_of(checkpoint.read_config(run), run)
    path = os.path.join(run, "eval_" + re.sub(r"[^\w.-]+", "_", args.row) + ".jsonl")
    if not os.path.isfile(path):
        cli.die(f"{path} does not exist: run eval.py with that row first")
    shots = checkpoint.read_logs(run, world, f"--planner-shots {args.planner_shots}")[:args.planner_shots]
    model, tok = planner.load(args.planner)
    pl = planner.Planner(model, tok, world, shots)
    stop = tok.convert_tokens_to_ids(pl.eot)
    n = same_text = valid = same_choice = 0
    for rec in data.read_jsonl(path):
        turns = rec["turns"]
        for k, t in enumerate(turns):
            if t["role"] != "agent":
                continue
            history = [u["strategy"] for u in turns[:k] if u["role"] == "agent"]
            allowed = world.allowed(history)
            ids = serialize.encode(tok, planner.render(tok, planner.messages(world, turns[:k], shots)))
            new = engine.generate(model, [ids], tok.pad_token_id, stop, planner.ANSWER_TOKENS, temperature=0)[0]
            ctx = engine.Context(model, [ids], tok.pad_token_id)
            scores = pl.scores(ctx, 0, ctx.logits()[0], allowed)
            served_z, ok = planner.parse(t["planner_answer"], world.STRATEGIES, allowed)
            n += 1
            same_text += t["planner_answer"].strip() == tok.decode(new, skip_special_tokens=True).strip()
            valid += ok
            same_choice += ok and served_z == max(allowed, key=lambda z: scores[z])
    out = {"decisions": n, "generated_equals_served": same_text, "served_valid": valid,
           "served_valid_equals_scored": same_choice}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
