"""The XLA path's compiled temporary memory grows about linearly with seq; the reference's
quadratically (docs/xla_memory.md: no [seq, seq] tensor in the XLA path)."""

import pytest

from moba_jax.memory import temp_bytes


def test_xla_temp_memory_is_linear_and_reference_quadratic_in_seq():
  """The xla path's plan is its O(T) state plus one chunk of queries' workspace, which the
  chunk budget bounds (docs/xla_memory.md). Linear: with a 1 MiB budget (4 queries a chunk
  here) the workspace is small beside the state, so 4x the tokens plan 4x the bytes (CPU: 4.00
  forward, 3.91 forward + backward; a [T, T/block] gate score buffer would add 16x its 8K size).
  Bounded: at the default budget the plan exceeds that state by at most a few budgets (the
  gathered keys and values, and their gradients; CPU at 32K: 1.3 and 2.3 budgets). How much of
  a chunk a plan holds is the backend's fusion choice (compiled for an H100, run 45: 14.3 MB
  forward at 8K, 101.9 MB at 32K: likely the chunk fused away at 8K only), so the growth is not read
  at the default budget. The reference at 4K and 16K: its [heads, T, T] float32 scores are 8 GiB
  at 32K, more than a GPU compile's autotuner could allocate beside the other shards of the
  compiled suite (run 44, an H100 at a tenth of its memory)."""
  from moba_jax.moba import DEFAULT_CHUNK_BUDGET_BYTES as budget
  kw = dict(heads=2, kv_heads=2, head_dim=64, block_size=128, topk=3)
  for backward in (False, True):
    state = [temp_bytes("xla", s, backward=backward, chunk_budget_bytes=2**20, **kw)
             for s in (8192, 32768)]
    assert 3.5 < state[1] / state[0] < 4.5, state  # 4x the tokens: 4x the memory
    xla = temp_bytes("xla", 32768, backward=backward, **kw)
    assert xla - state[1] < 4 * budget, (xla, state[1])
    ref = [temp_bytes("reference", s, backward=backward, **kw) for s in (4096, 16384)]
    assert ref[1] / ref[0] > 12, ref  # ~16x
    assert xla < ref[1] / 4  # at twice the reference's length, under a quarter of its plan
  with pytest.raises(ValueError, match="xla path's, not 'reference'"):
    temp_bytes("reference", 256, chunk_budget_bytes=2**20, **kw)


def test_the_memory_tools_mistakes_are_one_line(capsys):
  from moba_jax import memory
  for argv, says in ((["--impls", "bogus", "--seqs", "256"], "implementation='bogus'"),
                     (["--seqs", "0"], "'0' must be an integer >= 1")):
    assert memory.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and says in err, (out, err)
    assert err.startswith("python -m moba_jax.memory: ")
