"""Data: deterministic synthetic tasks, packing, masks, process sharding, iterator state."""

import json

import numpy as np
import pytest

from moba_jax import config as C
from moba_jax import data as D


def cfg_for(task, *extra):
  return C.load_config(None, [f"data.task={task}", "train.seq_len=256", "data.prefetch=0",
                              *extra])


def check_row(row, seq):
  assert all(row[k].shape == (seq,) for k in D.FIELDS)
  seg, pos = row["segment_ids"], row["positions"]
  starts = np.concatenate([[True], seg[1:] != seg[:-1]])
  assert np.all(pos[starts] == 0) and np.all(pos[~starts] == pos[np.flatnonzero(~starts) - 1] + 1)
  inner = ~starts[1:]  # within a document, targets are the next inputs
  assert np.all(row["targets"][:-1][inner] == row["inputs"][1:][inner])
  return starts


@pytest.mark.parametrize("task", ["kv_retrieval", "passkey", "lm"])
def test_rows_are_deterministic_and_packed(task):
  cfg = cfg_for(task)
  src = D.RowSource(cfg)
  a, b, other = src[5], src[5], D.RowSource(cfg_for(task, "data.seed=7"))[5]
  assert all(np.array_equal(a[k], b[k]) for k in D.FIELDS)
  assert not np.array_equal(a["inputs"], other["inputs"])
  starts = check_row(a, 256)
  n_docs = [int(check_row(src[i], 256).sum()) for i in range(20)]
  assert max(n_docs) > 1  # variable-length examples are packed
  if task == "lm":
    assert a["mask"].sum() == 256
  else:
    assert 0 < a["mask"].sum() < 64
    assert np.all(a["mask"][starts] == 0)


def test_kv_answers_require_retrieval():
  cfg = cfg_for("kv_retrieval", "data.key_len=2", "data.value_len=3", "data.num_queries=2")
  row = D.RowSource(cfg, "eval")[0]  # one full-length example
  tokens = np.concatenate([row["inputs"], row["targets"][-1:]])
  assert row["segment_ids"].max() == 1
  q_at = np.flatnonzero(tokens == D.QUERY)
  assert len(q_at) == 2 and q_at[0] > 150  # questions at the end of a long prompt
  for q in q_at:
    key, value = tokens[q + 1:q + 3], tokens[q + 4:q + 7]
    assert np.all(row["mask"][q + 3:q + 6] == 1)  # targets of the answer's tokens
    hits = [p for p in np.flatnonzero(tokens[:q_at[0]] == D.KEY)
            if np.array_equal(tokens[p + 1:p + 3], key)]
    assert len(hits) == 1  # keys are unique: one place in the prompt holds the answer
    p = hits[0]
    assert np.array_equal(tokens[p + 4:p + 7], value)
  assert row["mask"].sum() == 6


def test_passkey_answer_is_the_needle():
  cfg = cfg_for("passkey", "data.passkey_len=4")
  row = D.RowSource(cfg, "eval")[3]
  tokens = np.concatenate([row["inputs"], row["targets"][-1:]])
  n = int(np.flatnonzero(tokens == D.NEEDLE)[0])
  answer = row["targets"][row["mask"] == 1]
  assert np.array_equal(answer, tokens[n + 1:n + 5]) and len(answer) == 4


def test_difficulty_knobs_change_the_prompt():
  dense = D.RowSource(cfg_for("kv_retrieval"), "eval")[0]
  sparse = D.RowSource(cfg_for("kv_retrieval", "data.filler=0.8"), "eval")[0]
  assert (dense["inputs"] == D.KEY).sum() > 2 * (sparse["inputs"] == D.KEY).sum()
  few = D.RowSource(cfg_for("kv_retrieval", "data.kv_pairs=10", "data.pack=false"), "eval")[0]
  assert (few["inputs"] == D.KEY).sum() == 10


def test_process_shards_make_the_same_global_batch():
  cfg = cfg_for("kv_retrieval", "train.batch_size=4")
  whole = iter(D.train_dataset(cfg, 0, 1))
  halves = [iter(D.train_dataset(cfg, p, 2)) for p in range(2)]
  for _ in range(2):
    w = next(whole)
    parts = [next(h) for h in halves]
    for k in D.FIELDS:
      assert np.array_equal(w[k], np.concatenate([p[k] for p in parts]))


def test_iterator_state_resumes_exactly():
  cfg = cfg_for("lm", "train.batch_size=2", "data.prefetch=2")
  it = iter(D.train_dataset(cfg))
  next(it), next(it)
  state = it.get_state()
  expected = next(it)
  it2 = iter(D.train_dataset(cfg))
  it2.set_state(state)
  got = next(it2)
  assert all(np.array_equal(expected[k], got[k]) for k in D.FIELDS)


def test_jsonl_text_and_sft(tmp_path):
  path = tmp_path / "d.jsonl"
  lines = [{"prompt": f"question {i}? ", "response": f"answer {i}"} for i in range(5)]
  lines += [{"text": "plain text " * 3}]
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  cfg = C.load_config(None, ["data.task=jsonl", f"data.path={path}", "model.vocab_size=259",
                             "train.seq_len=64", "eval.trailing_tokens=8"])
  row = D.RowSource(cfg)[0]
  check_row(row, 64)
  sft = D.load_jsonl(str(path))[0]
  text = bytes((sft[0][sft[1] == 1][:-1] - D.BYTE_OFFSET).astype(np.uint8)).decode()
  assert text == "answer 0"
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"foo": 1}\n')
  with pytest.raises(ValueError, match="needs 'text' or 'prompt' and 'response'"):
    D.load_jsonl(str(bad))
