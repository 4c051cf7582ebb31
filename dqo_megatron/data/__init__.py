"""Offline trajectory data: records, tokenization, Megatron indexed files, readers and batching.

  records     the record format (JSONL / Parquet / datasets dir) and its validation
  tokenize    chat-templated prompt + response + EOS (none when `truncated`), per-token rewards and behavior log-probs
  indexed     aligned <prefix>_{tokens,rewards,behavior_logprobs,ref_logprobs,meta} indexed files
  preprocess  records -> indexed files with worker processes (`dqo-megatron preprocess`)
  dataset     TrajectoryDataset over the indexed files
  batching    pad_collate, DistributedTrajectorySampler
  pairs       DPO pairs (correct x incorrect of a prompt, at most 12 per prompt)

Nothing here imports typer; megatron-core is imported only where indexed files are read or written.
"""
