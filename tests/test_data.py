"""Data: deterministic synthetic tasks, packing, masks, process sharding, iterator state."""

import json
import re

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


def test_held_out_lm_mask_weighs_every_real_target(tmp_path, monkeypatch):
  """Held-out rows' lm_mask (eval's all-token losses) is 1 on every target inside a document and
  0 on padding and on a target across documents: LM-stream windows of many documents, SFT
  windows, one prompt/response example then padding, a synthetic task's full-length row.
  Training rows carry no lm_mask."""
  monkeypatch.chdir(tmp_path)
  docs = [{"text": f"doc {i} " + "x" * (20 + 7 * i)} for i in range(40)]
  with open("t.jsonl", "w") as f:
    f.write("\n".join(json.dumps(x) for x in docs) + "\n")
  corpus = ["data.task=corpus", "data.path=t.jsonl", "model.vocab_size=259", "train.seq_len=256",
            "eval.trailing_tokens=8"]
  stream = D.RowSource(C.load_config(None, corpus), "eval")
  multi = 0
  for r in range(6):
    row = stream[r]
    seg = row["segment_ids"]
    inside = (seg[1:] == seg[:-1]).astype(np.float32)  # (the last target's document: unseen)
    assert np.array_equal(row["lm_mask"][:-1], inside)
    assert np.array_equal(row["mask"], row["lm_mask"])
    multi += int(seg.max() > 1)
  assert multi == 6  # documents of 27-300 bytes: several a 256-token window
  windows = D.RowSource(C.load_config(None, corpus + ["data.response_tokens=32"]), "eval")[0]
  assert windows["lm_mask"].sum() == 256 and windows["mask"].sum() == 32
  with open("e.jsonl", "w") as f:
    f.write(json.dumps({"prompt": "q? ", "response": "an answer"}) + "\n")
  example = D.RowSource(C.load_config(None, [*corpus[:1], "data.path=e.jsonl", *corpus[2:]]),
                        "eval")[0]
  n = len("q? an answer") + 1  # BOS q? an answer EOS: 14 tokens, 13 targets
  assert example["lm_mask"][:n].sum() == n and example["lm_mask"][n:].sum() == 0
  kv = D.RowSource(cfg_for("kv_retrieval"), "eval")[0]
  assert kv["lm_mask"].sum() == 256 and 0 < kv["mask"].sum() < 64
  assert "lm_mask" not in D.RowSource(cfg_for("kv_retrieval"))[0]


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


def test_kv_pairs_hold_in_every_packed_example_or_are_refused():
  """data.kv_pairs pairs in every example, packed ones too (they were cut to what each random
  length held: kv_pairs=1000 at seq 64 trained as kv_pairs=0); a count no row can hold is named."""
  source = D.RowSource(cfg_for("kv_retrieval", "data.kv_pairs=12", "data.num_queries=2"))
  n_examples = 0
  for r in range(8):
    row = source[r]
    for seg in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
      at = row["segment_ids"] == seg
      if row["targets"][at][-1] == D.EOS:  # whole (a row's last piece may be cut by its end)
        n_examples += 1
        example = row["inputs"][at]
        assert (example == D.KEY).sum() == 12 and (example == D.QUERY).sum() == 2
  assert n_examples >= 8
  with pytest.raises(ValueError, match=r"train.seq_len=256 must be >= 397 .* with these "
                                       r"kv_pairs/key_len"):
    D.check_config(cfg_for("kv_retrieval", "data.kv_pairs=62"))  # (62 + 4) pairs of 6, and BOS
  with pytest.raises(ValueError, match=r"data.kv_pairs=1 must be 0 \(as many as fit\) or >= "
                                       r"data.num_queries=4"):
    D.check_config(cfg_for("kv_retrieval", "data.kv_pairs=1"))


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


def segments(row):
  """[(tokens, mask of their targets)] per segment: tokens = its inputs then its last target."""
  seg = row["segment_ids"]
  starts = np.flatnonzero(np.diff(seg, prepend=seg[0] - 1))
  return [(np.append(row["inputs"][s:e], row["targets"][e - 1]), row["mask"][s:e])
          for s, e in zip(starts, np.append(starts[1:], len(seg)))]


def decode(tokens):
  body = tokens[(tokens != D.BOS) & (tokens != D.EOS)]
  return bytes((body - D.BYTE_OFFSET).astype(np.uint8)).decode()


def test_jsonl_example_longer_than_a_row_keeps_its_response(tmp_path, monkeypatch):
  """An example longer than the row fills it alone, cut at its prompt's start: the response and
  its EOS whole, and the loss on them only; a short example after it waits for the next row."""
  monkeypatch.chdir(tmp_path)
  lines = [{"prompt": "p" * 200, "response": "the answer"}, {"prompt": "q? ", "response": "a"}]
  with open("d.jsonl", "w") as f:
    f.write("\n".join(json.dumps(x) for x in lines) + "\n")
  cfg = C.load_config(None, ["data.task=corpus", "data.path=d.jsonl", "model.vocab_size=259",
                             "train.seq_len=64", "eval.trailing_tokens=8"])
  src, longs = D.RowSource(cfg), 0
  for r in range(12):
    row = src[r]
    check_row(row, 64)
    segs = [(t, m) for t, m in segments(row) if not np.all(t == D.PAD)]
    if any(len(t) == 65 for t, _ in segs):
      longs += 1
      assert len(segs) == 1
      tokens, mask = segs[0]
      assert tokens[0] != D.BOS  # 65 tokens: the last 64 bytes and EOS
      assert decode(tokens) == ("p" * 200 + "the answer")[-64:]
      assert tokens[-1] == D.EOS and decode(tokens[1:][mask == 1]) == "the answer"
      assert mask.sum() == len("the answer") + 1
    else:
      assert all(decode(t) == "q? a" for t, _ in segs)
  assert 0 < longs < 12


def test_an_example_without_a_target_is_named_up_front(tmp_path):
  """A tokenizer with neither BOS nor EOS can encode a line to one token: no target, so a row of
  such examples would never fill. CorpusRows names the line instead."""
  from moba_jax import corpus

  class OneTokenPerLine:  # the interface of moba_jax.tokenizer's tokenizers that DocTokens uses
    byte_level, bos, eos = False, None, None

    def encode(self, data):
      return np.array([5] if data else [], np.int32)

  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps({"prompt": "", "response": f"r{i}"}) + "\n"
                          for i in range(3)))
  docs = corpus.open_jsonl(path).splits["train"]
  with pytest.raises(ValueError, match=r"d.jsonl:\d: encodes to 1 token\(s\), fewer than the 2 "):
    D.CorpusRows(docs, 64, 0, True, OneTokenPerLine())


def test_jsonl_text_and_sft(tmp_path, monkeypatch):
  """data.task=corpus over a .jsonl file: whole examples packed (BOS to EOS, several a row), loss
  on each response and its EOS (every target of a text line); eval rows are one whole example
  each."""
  monkeypatch.chdir(tmp_path)  # lines are named "d.jsonl:N" (none held out: eval uses them all)
  path = "d.jsonl"
  lines = [{"prompt": f"question {i}? ", "response": f"answer {i}"} for i in range(5)]
  lines += [{"text": "plain text " * 3}]
  with open(path, "w") as f:
    f.write("\n".join(json.dumps(x) for x in lines) + "\n")
  cfg = C.load_config(None, ["data.task=corpus", f"data.path={path}", "model.vocab_size=259",
                             "train.seq_len=64", "eval.trailing_tokens=8"])
  src = D.RowSource(cfg)
  assert src.rows.kind == "examples"
  kinds, per_row = {"sft": 0, "text": 0}, []
  for split, r in [("train", r) for r in range(30)] + [("eval", r) for r in range(4)]:
    row = (src if split == "train" else D.RowSource(cfg, "eval"))[r]
    check_row(row, 64)
    real = 0
    for tokens, mask in segments(row):
      if np.all(tokens == D.PAD):
        assert np.all(mask == 0)  # padding
        continue
      real += 1
      targets = tokens[1:]
      assert tokens[0] == D.BOS and tokens[-1] == D.EOS  # whole: every example fits a row
      if mask[0] == 0:  # SFT: the prompt is masked, the response and its EOS are the loss
        answer = targets[mask == 1]
        i = int(decode(answer)[len("answer "):])
        assert decode(answer) == f"answer {i}" and np.all(mask[:len(targets) - len(answer)] == 0)
        assert decode(tokens) == lines[i]["prompt"] + f"answer {i}"
        kinds["sft"] += 1
      else:
        assert np.all(mask == 1) and decode(tokens) == "plain text " * 3
        kinds["text"] += 1
    if split == "eval":
      assert real == 1  # unpacked: one example
    else:
      per_row.append(real)
  assert kinds["sft"] > 5 and kinds["text"] > 0
  assert np.mean(per_row) > 1.5  # packed: 19-34-token examples, up to three a 64-token row
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"foo": 1}\n')
  with pytest.raises(ValueError, match=re.escape(f"{bad}:2: a line needs 'text' or 'prompt'")):
    D.RowSource(C.load_config(None, ["data.task=corpus", f"data.path={bad}",
                                     "model.vocab_size=259"]))
