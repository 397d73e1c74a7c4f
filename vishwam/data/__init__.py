"""Data: files to token ids, packed into fixed windows, served in an order that is a function of `(seed, step)`.

- `text`: file formats, the tokenizer, the text token stream, `PackedDataset`, `batch_for_step`.
- `chat`: chat templates rendered as transformers renders them, assistant spans.
- `chat_rows`: chat rows to token ids with per-token targets, packed with segment ids.
- `alignment`: byte alignment of two tokenizations (cross-tokenizer chunks), the shared vocabulary, byte tables.
- `cross_windows`: cross-tokenizer windows cut from both sides' streams and their chunk ids (a `cross` token
  store's, or in memory), static shapes, `CrossDataset`.
- `vocab_transfer`: FVT, a student vocabulary's embeddings from the teacher's.
- `tables`: `.parquet` and `datasets` `save_to_disk` directories (the `[data]` extra).

Imports `models`, `distill`, `vishwam.errors`, `vishwam.io` and `vishwam.config`.
"""
