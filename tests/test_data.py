"""The record schema survives the datasets.Dataset and JSONL round trips; seeds never overlap."""
import data
import shop


def test_dataset_and_jsonl_round_trip(tmp_path):
    recs = [shop.play(shop.make_scenario(s), shop.behaviour_policy) for s in data.train_seeds(5)]
    ds = data.to_dataset(recs)
    assert len(ds) == 5 and set(data.RECORD_FIELDS) <= set(ds.column_names)
    back = data.from_dataset(ds)
    assert [r["turns"] for r in back] == [r["turns"] for r in recs]
    assert [r["scenario"] for r in back] == [r["scenario"] for r in recs]
    path = tmp_path / "logs.jsonl"
    data.write_jsonl(recs, str(path))
    assert data.read_jsonl(str(path), shop.STRATEGIES, shop.EVENTS) == recs


def test_train_and_test_seeds_are_disjoint():
    train = set(data.train_seeds(100_000))
    test = set(data.test_seeds(10_000))
    assert not train & test
    assert min(test) >= data.TEST_SEED_BASE > max(train)
