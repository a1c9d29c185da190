"""An independent, literal NumPy MoBA (loops over documents, heads and queries, float64).

It follows docs/semantics.md word for word and shares no code with moba_jax: block means over
the tokens a block really has, float gate scores, current block always chosen, top-(k-1) past blocks
with ties to the lower index, causal softmax over the union of chosen blocks.
"""

import json
import math
import pathlib

import numpy as np

GOLDEN_DIR = pathlib.Path(__file__).parent / "data" / "moba_golden"


def golden_cases():
  return [case["name"] for case in json.loads((GOLDEN_DIR / "index.json").read_text())]


def load_golden(name):
  """Golden case in the library's layout: arrays [1, T, H, D], segment_ids [1, T]."""
  data = dict(np.load(GOLDEN_DIR / f"{name}.npz"))
  cu = data["cu_seqlens"]
  seg = np.zeros(cu[-1], np.int32)
  for i in range(len(cu) - 1):
    seg[cu[i]:cu[i + 1]] = i
  out = {key: data[key][None] for key in ("q", "k", "v", "out", "cotangent", "dq", "dk", "dv")}
  out.update(segment_ids=seg[None], block_size=int(data["block_size"]), topk=int(data["topk"]))
  return out


def doc_bounds(segment_row):
  """[(start, end)] of maximal runs of equal segment ids."""
  bounds, start = [], 0
  for t in range(1, len(segment_row) + 1):
    if t == len(segment_row) or segment_row[t] != segment_row[start]:
      bounds.append((start, t))
      start = t
  return bounds


def chosen_blocks(q_t, kbar, current, topk):
  """Current block plus the top (topk - 1) past blocks by score, ties to the lower index."""
  scores = [float(np.dot(q_t, kbar[j])) for j in range(current)]
  past = sorted(range(current), key=lambda j: (-scores[j], j))[:topk - 1]
  return {current, *past}


def moba_numpy(q, k, v, segment_ids, block_size, topk, scale=None):
  """q [B, T, H, D], k/v [B, T, K, D], segment_ids [B, T] -> out [B, T, H, D] float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, _, heads, dim = q.shape
  groups = heads // k.shape[2]
  scale = dim ** -0.5 if scale is None else scale
  out = np.zeros(q.shape)
  for b in range(batch):
    for start, end in doc_bounds(np.asarray(segment_ids[b])):
      n_blocks = math.ceil((end - start) / block_size)
      for h in range(heads):
        kh, vh = k[b, start:end, h // groups], v[b, start:end, h // groups]
        kbar = [kh[j * block_size:(j + 1) * block_size].mean(0) for j in range(n_blocks)]
        for t in range(end - start):
          chosen = chosen_blocks(q[b, start + t, h], kbar, t // block_size, topk)
          keys = [u for u in range(t + 1) if u // block_size in chosen]
          logits = kh[keys] @ q[b, start + t, h] * scale
          p = np.exp(logits - logits.max())
          out[b, start + t, h] = (p / p.sum()) @ vh[keys]
  return out
