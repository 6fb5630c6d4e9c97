"""The record schema survives the JSONL round trip; seeds never overlap."""
import data
from worlds import shop


def test_jsonl_round_trip(tmp_path):
    recs = [shop.play(shop.make_scenario(s), shop.behaviour_policy) for s in data.train_seeds(5)]
    path = tmp_path / "logs.jsonl"
    data.write_jsonl(recs, str(path))
    assert data.read_jsonl(str(path), shop.STRATEGIES, shop.EVENTS) == recs


def test_train_and_test_seeds_are_disjoint():
    train = set(data.train_seeds(100_000))
    test = set(data.test_seeds(10_000))
    assert not train & test
    assert min(test) >= data.TEST_SEED_BASE > max(train)
