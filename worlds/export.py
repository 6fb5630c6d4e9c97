"""Write a run's training dialogues (logs.jsonl) as a Hugging Face dataset, the form other labs share.

    python -m worlds.export out/gopo                     # -> out/gopo/logs_dataset/
    python -m worlds.export out/gopo --out shop_logs     # anywhere else
    python -c "import datasets; print(datasets.load_from_disk('shop_logs')[0])"
    python train.py --logs shop_logs                       # a built-in world trains on them again
    python train.py --data records --data-path shop_logs   # or a logged-context world does

The folder is `Dataset.save_to_disk`'s, one row per dialogue in the schema of worlds/hf.py;
`datasets.load_from_disk` reads it back and worlds.hf turns the rows into records equal to the
logs.jsonl ones. (`datasets.load_dataset` refuses save_to_disk folders by design; to share on the
hub, `load_from_disk(DIR).push_to_hub(ID)`, then `load_dataset(ID)` or `--logs ID --no-offline`.)
"""
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # python worlds/export.py works as well as python -m worlds.export
    sys.path.insert(0, ROOT)

import cli  # noqa: E402
import data  # noqa: E402
from worlds import hf  # noqa: E402

p = cli.Parser(__doc__)
p.add_argument("run", help="run folder written by train.py (holds logs.jsonl)")
p.add_argument("--out", default=None, help="dataset folder to write; None: RUN/logs_dataset")
p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def main(argv=None):
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.run, "logs_dataset")
    if not os.path.isdir(args.run):
        cli.die(f"{args.run}: no such run folder (give the folder train.py wrote, e.g. out/gopo)")
    if os.path.isfile(out):
        cli.die(f"{out} is a file; --out names the dataset folder to write")
    if os.path.exists(out) and not args.overwrite:
        cli.die(f"{out} already exists; pass --overwrite to replace it, or another --out")
    try:
        records = data.read_jsonl(os.path.join(args.run, "logs.jsonl"))
        dataset = hf.to_dataset(records, os.path.join(args.run, "logs.jsonl"))
    except data.DataError as e:
        cli.die(str(e))
    tmp = f"{out}.tmp"   # written aside, then swapped in: a crash leaves the old folder or the new one
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"wrote {len(records)} dialogues to {out} (datasets.load_from_disk reads it; train.py --logs {out} "
          f"trains on it)")


if __name__ == "__main__":
    main()
