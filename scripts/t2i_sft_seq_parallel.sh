#!/usr/bin/env bash
# text-to-image SFT of Emu3 with sequence parallelism + ZeRO-3 (msrun, one process per device).
# 8 Ascend NPUs: MODEL_PATH=Emu3-Stage1 DATA_PATH=<prepared data> bash scripts/t2i_sft_seq_parallel.sh
# CPU without arguments: 2 processes fine-tune the tiny random demo model on synthetic data.
# Environment and options: see scripts/sft_seq_parallel.sh and docs/training.md.
exec bash "$(dirname "$0")/sft_seq_parallel.sh" t2i "$@"
