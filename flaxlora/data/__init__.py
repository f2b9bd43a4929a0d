"""Data for flaxlora's experiments: read, tokenise, batch, shard.

The stages, each a module:

  sources         records from local TSV/CSV/JSONL/SQuAD-JSON files or (with
                  the `data` extra) the Hugging Face hub; errors name the file
                  and line. `sources.load(kind, file_or_hub_name, ...)`.
  synthetic       generated tasks (seq2seq, classification, QA) and a words
                  tokenizer for offline `runlocal` runs and tests.
  byte_tokenizer  a ByT5-style byte tokenizer that needs no files.
  buckets         the `Tokenized` container (variable-length rows) and the
                  length-bucket padding that bounds recompiles.
  classification  BERT single-sentence and sentence-pair features.
  squad           extractive-QA features (doc stride, answer positions) and
                  n-best span post-processing.
  seq2seq         T5 source/target features (summarization, text-to-text QA).
  pipeline        deterministic shuffling, per-process shards of fixed global
                  batches, and an iterator whose position is checkpointable.
  task_data       a run's config -> records -> tokenized train/eval data.

A typical flow:

  records = sources.read_classification('sst2/train.tsv', labels=('0', '1'))
  data = classification.tokenize(records, tokenizer, max_length=64,
                                 buckets=(32, 64))
  loader = pipeline.Loader(data, global_batch_size=32, seed=0)
  for batch in loader: ...   # dict of numpy arrays, leading dim B / processes
  ckpt['data'] = loader.state(); ...; loader.restore(ckpt['data'])
"""
