"""The XLA path's compiled temporary memory grows about linearly with seq; the reference's
quadratically (docs/xla_memory.md: no [seq, seq] tensor in the XLA path)."""

from moba_jax.memory import temp_bytes


def test_xla_temp_memory_is_linear_and_reference_quadratic_in_seq():
  """The xla path at 8K and 32K tokens: both past the length where a chunk of queries fills its
  budget (256 queries here), so what grows is the O(T) state. Below it the plan depends on the
  backend's fusions: compiled for an H100 (run 42) the forward planned 7.8 MB at 2K and 73 MB at
  8K (one chunk's gathered keys materialized, the budget's size), where the CPU plans 106 and
  118 MB. The reference at 4K and 16K: its [heads, T, T] float32 scores are 8 GiB at 32K, more
  than a GPU compile's autotuner could allocate beside the other shards of the compiled suite
  (run 44, an H100 at a tenth of its memory: "Out of memory while trying to allocate 8.02GiB")."""
  kw = dict(heads=2, kv_heads=2, head_dim=64, block_size=128, topk=3)
  for backward in (False, True):
    xla = [temp_bytes("xla", s, backward=backward, **kw) for s in (8192, 32768)]
    ref = [temp_bytes("reference", s, backward=backward, **kw) for s in (4096, 16384)]
    assert xla[1] / xla[0] < 6, xla  # 4x the tokens: ~4x the memory
    assert ref[1] / ref[0] > 12, ref  # ~16x
    assert xla[1] < ref[1] / 4  # at twice the reference's length, under a quarter of its plan


def test_the_memory_tools_mistakes_are_one_line(capsys):
  from moba_jax import memory
  for argv, says in ((["--impls", "bogus", "--seqs", "256"], "implementation='bogus'"),
                     (["--seqs", "0"], "'0' must be an integer >= 1")):
    assert memory.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and says in err, (out, err)
    assert err.startswith("python -m moba_jax.memory: ")
