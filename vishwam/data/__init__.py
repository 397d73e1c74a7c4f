"""Data: files to token ids, packed into fixed windows, served in an order that is a function of `(seed, step)`.

- `text`: file formats, the tokenizer, the text token stream, `PackedDataset`, `batch_for_step`.
- `chat`: chat templates rendered as transformers renders them, assistant spans.
- `chat_rows`: chat rows to token ids with per-token targets, packed with segment ids.
- `cross`: cross-tokenizer data (byte alignment, both sides' windows, chat rows, FVT), a subpackage.
- `tables`: `.parquet` and `datasets` `save_to_disk` directories (the `[data]` extra).

Imports `models`, `distill`, `vishwam.errors`, `vishwam.io` and `vishwam.config`.
"""
