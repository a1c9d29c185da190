# run 23b: variants of the fused dQ (MOBA_FUSED_EXPERIMENT), per-kernel profiles at 8K and 32K
t() { MOBA_FUSED_EXPERIMENT=rows XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 timeout 150 python3 -m pytest -q -rfEs -W ignore --compiled -p no:cacheprovider -k "$2" tests/test_mosaic.py > $OUT/rows_$1.txt 2>&1; echo "exit $?" >> $OUT/rows_$1.txt; }
t d64 "matches_the_oracle and d64" & t d128 "matches_the_oracle and d128_block256" & wait
tail -qn 2 $OUT/rows_*.txt
for e in noadd nodq rows base; do for spec in "8192 512 3" "32768 512 3" "16384 128 8"; do set -- $spec
  echo "== $e seq $1 block $2 topk $3" | tee -a $OUT/profiles.txt
  MOBA_FUSED_EXPERIMENT=$e timeout 80 python3 tools/profile_gpu.py --seq $1 --block $2 --topk $3 --top 5 2>&1 | grep -v "WARNING\|device lines\|gap" | tee -a $OUT/profiles.txt
done; done
